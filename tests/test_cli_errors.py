"""User errors end with one sentence and exit code 2, never a traceback; hooks never outlive a capture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cli_checks import assert_no_exception, assert_one_line_error
from typer.testing import CliRunner

from moe_inspect.cli import app
from moe_inspect.errors import NotMoEError

runner = CliRunner()


def _fails_cleanly(args: list[str], needle: str, stdin: str | None = None, after_load: bool = False) -> str:
    return assert_one_line_error(runner.invoke(app, args, input=stdin), needle, after_load=after_load)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (no router) with a tokenizer, saved like a real checkpoint."""
    from tiny_models import train_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("dense")
    tokenizer = train_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_missing_model_folder() -> None:
    _fails_cleanly(["route", "hi", "-m", "./no/such/model"], "No model folder at './no/such/model'.")


def test_real_cli_process_prints_one_sentence(tmp_path: Path) -> None:
    """The console entry point in its own process (no CliRunner): exit 2, one stderr line, nothing on stdout."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run(
        [sys.executable, "-c", "from moe_inspect.cli import main; main()", "route", "hi", "-m", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: The folder {tmp_path} has no config.json."] or (
        len(lines) == 1 and lines[0].startswith("Error: ") and "has no config.json" in lines[0]
    ), lines


def test_folder_without_config(tmp_path: Path) -> None:
    _fails_cleanly(["route", "hi", "-m", str(tmp_path)], "has no config.json")


def test_hub_id_offline_without_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    _fails_cleanly(["route", "hi", "-m", "someone/not-cached-moe"], "not in the local Hugging Face cache")


def test_dense_model_is_not_moe(dense_dir: Path) -> None:
    output = _fails_cleanly(["route", "hi", "-m", str(dense_dir)], "Model type 'llama' has no MoE router")
    assert "LlamaForCausalLM" in output


def test_bad_options(tiny_dir) -> None:
    model = str(tiny_dir("mixtral"))
    _fails_cleanly(["route", "hi", "-m", model, "--layers", "3-1"], "--layers")
    _fails_cleanly(["route", "hi", "-m", model, "--layers", "40"], "with no router", after_load=True)
    _fails_cleanly(["route", "hi", "-m", model, "--device", "tpu"], "--device must be")
    _fails_cleanly(["route", "  ", "-m", model], "The prompt is empty.")
    _fails_cleanly(["route", "hi", "-m", model, "--load-in-4bit", "--load-in-8bit"], "Choose one of")
    if not torch.cuda.is_available():
        _fails_cleanly(["route", "hi", "-m", model, "--device", "cuda"], "no CUDA device is available")


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_broken_weights_are_one_sentence(tiny_dir, tmp_path: Path, damage: str) -> None:
    """A model folder whose weights are garbage or absent: the loader's failure becomes one sentence."""
    import shutil

    folder = Path(shutil.copytree(tiny_dir("mixtral"), tmp_path / "model"))
    if damage == "corrupt":
        (folder / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    else:
        (folder / "model.safetensors").unlink()
    needle = f"Could not load '{folder}'"
    error = _fails_cleanly(["route", "hi", "-m", str(folder)], needle)
    assert ("deserializing header" if damage == "corrupt" else "no file named model.safetensors") in error


def test_route_output_errors_are_one_sentence(tiny_dir, tmp_path: Path) -> None:
    """--csv naming a directory is refused before the model loads (it used to fail after, with a traceback)."""
    _fails_cleanly(["route", "hi", "-m", str(tiny_dir("mixtral")), "--csv", str(tmp_path)], "is a folder; name a file")


def test_prompt_from_stdin(tiny_dir, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["route", "-", "-m", str(tiny_dir("mixtral")), "--csv", str(out), "-q"], input="a b")
    assert_no_exception(result)
    assert out.exists()


def test_hooks_removed_even_when_forward_raises(tiny_dir) -> None:
    from moe_inspect.model.capture import capture
    from moe_inspect.model.loading import load
    from moe_inspect.model.options import LoadOptions

    loaded = load(LoadOptions(str(tiny_dir("mixtral"))))
    modules = [spec.module for spec in loaded.routers]
    before = [len(m._forward_hooks) for m in modules]
    with pytest.raises(RuntimeError, match="boom"), capture(loaded.routers):
        assert all(len(m._forward_hooks) > b for m, b in zip(modules, before, strict=True))
        raise RuntimeError("boom")
    assert [len(m._forward_hooks) for m in modules] == before


def test_not_moe_error_is_user_error() -> None:
    assert NotMoEError("x").exit_code == 2


def test_default_model_env_var(monkeypatch: pytest.MonkeyPatch, tiny_dir) -> None:
    from moe_inspect.model.source import resolve_model

    monkeypatch.setenv("MOE_INSPECT_MODEL", str(tiny_dir("mixtral")))
    assert resolve_model(None) == (str(tiny_dir("mixtral")), False)
    assert resolve_model("x/y") == ("x/y", False)
    monkeypatch.delenv("MOE_INSPECT_MODEL")
    path, is_default = resolve_model(None)
    assert is_default and os.path.basename(path) in {"demo-model", "demo_model"}
