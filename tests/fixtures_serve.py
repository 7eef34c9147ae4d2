"""Fixtures for the serve stage (filled in by that stage)."""
