"""Tests of peers/entry/."""
