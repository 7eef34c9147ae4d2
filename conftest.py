import os

# Before torch loads: idle OpenMP threads sleep instead of spinning, which matters a lot on 2 shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Shared pytest fixtures live in tests/fixtures_*.py, one file per stage owner, loaded here.
pytest_plugins = ["tests.fixtures_core", "tests.fixtures_export", "tests.fixtures_serve"]
