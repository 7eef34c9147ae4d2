"""Fixtures for the export stage (filled in by that stage)."""
