# Shared pytest fixtures live in tests/fixtures_*.py, one file per stage owner, loaded here.
pytest_plugins = ["tests.fixtures_core", "tests.fixtures_export", "tests.fixtures_serve"]
