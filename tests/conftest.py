"""Shared fixtures. Tests run offline: tiny models are built locally and never fetched from the Hub."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tiny models do microsecond-sized matmuls; with several intra-op threads on a shared 2-core machine each op waits
# on thread wake-ups (measured: a tiny forward took 0.3-1 s instead of 3 ms). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # so tests can `from tiny_models import ...`


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``get(model_type) -> folder`` with a saved tiny model + tokenizer, built once per test session."""
    from tiny_models import save_tiny  # lazy: importing transformers is slow and not every test needs it

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = save_tiny(model_type, root / model_type)
        return cache[model_type]

    return get
