"""Tests of dyvte/cli: the dyvte command."""
