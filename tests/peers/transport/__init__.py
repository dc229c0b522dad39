"""Tests of peers/transport/."""
