"""The shipped demo model: loads offline, has the documented shape, is the default, and ships in the wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moe_inspect
from moe_inspect.cli import app
from moe_inspect.model.loading import load
from moe_inspect.model.options import LoadOptions
from moe_inspect.model.source import demo_model_path

REPO = Path(__file__).resolve().parent.parent


def test_demo_model_has_documented_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_INSPECT_MODEL", raising=False)
    loaded = load(LoadOptions())
    assert loaded.is_default
    config = loaded.model.config
    assert config.model_type == "mixtral"
    assert (config.num_hidden_layers, config.hidden_size) == (4, 128)
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert len(loaded.tokenizer) == config.vocab_size == 4096
    assert [spec.layer for spec in loaded.routers] == [0, 1, 2, 3]
    assert all(spec.num_experts == 8 and spec.top_k == 2 for spec in loaded.routers)
    size = sum(f.stat().st_size for f in demo_model_path().iterdir())
    assert size < 20 * 2**20


def test_route_without_model_uses_the_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MOE_INSPECT_MODEL", raising=False)
    csv = tmp_path / "route.csv"
    result = CliRunner().invoke(app, ["route", "def add(a, b): return a + b", "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    assert "Using the small demo model shipped with moe-inspect; pass --model" in result.output
    assert "4 MoE routers" in result.output
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("position,token_id,token,layer,rank,expert,weight,probability,router_entropy")
    # 4 layers x 2 ranks per token
    assert (len(rows) - 1) % 8 == 0 and len(rows) > 8


def test_training_log_records_sources_and_heldout_loss() -> None:
    log = json.loads((demo_model_path() / "training_log.json").read_text())
    assert {"code", "prose"} <= set(log["sources"])
    # measured by the training script on the bf16 weights as saved; the README's figures (below) are
    # fixtures/measure_demo_routing.py's, which packs the files through moe-inspect's own reader
    assert log["heldout_loss_nats"] == {"code": pytest.approx(2.897, abs=5e-4), "prose": pytest.approx(3.2077)}
    assert log["command"].startswith("python fixtures/train_demo_model.py")


@pytest.mark.slow
def test_heldout_losses_are_the_readme_figures() -> None:
    """README: 'code 2.897 nats (64,768 tokens), prose 3.205 nats (56,320 tokens)', by the README's method."""
    sys.path.insert(0, str(REPO / "fixtures"))
    try:
        from measure_demo_routing import HELDOUT, SEQ_LEN, heldout_loss
    finally:
        sys.path.remove(str(REPO / "fixtures"))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "code 2.897 nats (64,768 tokens), prose 3.205 nats (56,320" in readme
    insp = moe_inspect.load()
    for name, loss, tokens in (("code", 2.897, 64_768), ("prose", 3.205, 56_320)):
        reader = insp.corpus(files=[HELDOUT / f"{name}.txt"], seq_len=SEQ_LEN, batch_size=8)
        assert sum(b.tokens for b in reader.batches()) == tokens
        assert heldout_loss(insp, HELDOUT / f"{name}.txt") == pytest.approx(loss, abs=5e-4), name


@pytest.mark.slow
def test_wheel_ships_the_demo_model(tmp_path: Path) -> None:
    import hatchling  # noqa: F401  (the test extra installs it: a missing one must fail, not skip)

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("moe_inspect-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert f"moe_inspect/demo_model/{name}" in names


def test_info_without_model_describes_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_INSPECT_MODEL", raising=False)
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    assert "Using the small demo model shipped with moe-inspect" in result.output
    data = json.loads(result.stdout[result.stdout.index("{") :])
    assert (data["model_type"], data["num_layers"], data["num_experts"], data["top_k"]) == ("mixtral", 4, 8, 2)
    assert data["active_params"] < data["total_params"] == 4_396_160
