"""Shared fixtures. Tests run offline: tiny models are built locally and never fetched from the Hub."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tiny models do microsecond-sized matmuls; with several intra-op threads on a shared 2-core machine each op waits
# on thread wake-ups (measured: a tiny forward took 0.3-1 s instead of 3 ms). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # so tests can `from tiny_models import ...`


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``get(model_type, bos=False) -> folder`` with a saved tiny model + tokenizer, built once per test session.

    ``bos=True`` gives the same weights with a tokenizer that prefixes ``<s>`` (the corpus and balance tests):
    the folder is a copy of the plain one with the other tokenizer, so the model is built once.
    """
    from tiny_models import save_tiny, train_tiny_tokenizer  # lazy: importing transformers is slow

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple[str, bool], Path] = {}

    def get(model_type: str, bos: bool = False) -> Path:
        key = (model_type, bos)
        if key not in cache:
            if bos:
                path = shutil.copytree(get(model_type), root / f"{model_type}-bos")
                train_tiny_tokenizer(bos=True).save_pretrained(path)
                cache[key] = path
            else:
                cache[key] = save_tiny(model_type, root / model_type)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_inspector(tiny_dir: Callable[..., Path]) -> Callable[..., Any]:
    """``get(model_type, bos=False) -> Inspector`` on the session's tiny folder, loaded once and shared.

    Tests must leave it as they found it (hooks removed, tokenizer padding side restored).
    """
    cache: dict[tuple[str, bool], Any] = {}

    def get(model_type: str, bos: bool = False) -> Any:
        key = (model_type, bos)
        if key not in cache:
            import moe_inspect

            cache[key] = moe_inspect.load(str(tiny_dir(model_type, bos=bos)), device="cpu")
        return cache[key]

    return get
