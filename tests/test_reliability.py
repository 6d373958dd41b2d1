"""Reliability as a new user meets it (issue 10), through the real command line in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAIN = "from moe_inspect.cli import main; main()"


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}


def test_endless_stdin_is_streamed_and_stops_at_max_tokens(tmp_path: Path, tiny_dir: Any) -> None:
    """`yes | moe-inspect balance - --max-tokens N` ends, and nothing is written to the temporary folder."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    endless = subprocess.Popen(["yes", "def add(a, b): return a + b"], stdout=subprocess.PIPE)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", MAIN, "balance", "-", "-m", str(tiny_dir("mixtral")), "--seq-len", "16",
             "--max-tokens", "400", "--json", "-q"],
            stdin=endless.stdout, capture_output=True, text=True, env=_env(scratch), timeout=120, check=False,
        )
    finally:
        endless.kill()
        endless.wait()
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)["run"]
    assert run["tokens"] == 400
    assert 0 < run["corpus"][0]["bytes"] < 1 << 24  # read what was needed, not the endless rest
    assert list(scratch.iterdir()) == []
