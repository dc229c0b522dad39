"""Tests of peers/api/."""
