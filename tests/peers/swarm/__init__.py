"""Tests of peers/swarm/."""
