"""Bad input, tried as a new user would (issue 10): each case exits 2 with one sentence, no traceback, and
leaves no file behind. Cases that must be refused before the model loads run with loading forbidden."""

from __future__ import annotations

import errno
import importlib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moe_inspect.cli import app

runner = CliRunner()
cli_ablate = importlib.import_module("moe_inspect.cli.ablate")
cli_balance = importlib.import_module("moe_inspect.cli.balance")
cli_route = importlib.import_module("moe_inspect.cli.route")
TEXT = "def add(a, b):\n    return a + b\n" * 20


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_ablate, "load_for_cli", refuse)
    monkeypatch.setattr(cli_balance, "load_for_cli", refuse)
    monkeypatch.setattr(cli_route, "load_for_cli", refuse)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_sentence(result: Any, needle: str) -> str:
    output = result.output + result.stderr
    assert result.exit_code == 2, (output, result.exception)
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and lines[0].endswith("."), lines[0]
    assert needle in lines[0], lines[0]
    return lines[0]


# (name, args after the command, the words the sentence must contain); {d} is a folder, {f} a regular file
OUTPUT_CASES = [
    ("plot is a folder", ["balance", "{c}", "--plot", "{d}"], "is a folder; name a file"),
    ("plot under a file", ["balance", "{c}", "--plot", "{f}/x.png"], "is a file, not a folder"),
    ("out is a file", ["balance", "{c}", "--out", "{f}"], "is a file, not a folder"),
    ("out under a file", ["balance", "{c}", "--out", "{f}/run"], "is a file, not a folder"),
    ("ablate out is a file", ["ablate", "{c}", "--top-k", "1", "--out", "{f}"], "is a file, not a folder"),
    ("ablate out under a file", ["ablate", "{c}", "--out", "{f}/run"], "is a file, not a folder"),
    ("csv is a folder", ["route", "hi", "--csv", "{d}"], "is a folder; name a file"),
    ("csv under a file", ["route", "hi", "--csv", "{f}/deep/r.csv"], "cannot be created"),
]


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(("name", "args", "needle"), OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_unwritable_outputs_are_refused_before_the_model_loads(
    name: str, args: list[str], needle: str, tmp_path: Path, tiny_dir: Any
) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    before = _files(tmp_path)
    values = {"{c}": str(corpus), "{d}": str(tmp_path / "folder"), "{f}": str(tmp_path / "file")}
    argv = list(args)
    for i in range(len(argv)):
        for key, value in values.items():
            argv[i] = argv[i].replace(key, value)
    result = runner.invoke(app, [*argv, "-m", str(tiny_dir("mixtral"))])
    _one_sentence(result, needle)
    assert _files(tmp_path) == before


@pytest.mark.usefixtures("no_model_load")
def test_read_only_output_folder_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_dir: Any) -> None:
    """Root ignores permission bits, so a read-only file system is simulated where the probe creates its file."""
    import moe_inspect.io.export

    def read_only(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(moe_inspect.io.export.tempfile, "mkstemp", read_only)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    result = runner.invoke(app, ["balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--out", str(tmp_path / "o")])
    _one_sentence(result, "Read-only file system")
    assert not (tmp_path / "o").exists()


def test_write_failing_at_the_end_saves_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_dir: Any
) -> None:
    from moe_inspect.analysis.balance import BalanceReport

    real_write = BalanceReport.write
    target = tmp_path / "o"

    def disk_full(self: BalanceReport, out_dir: Any) -> Any:
        if Path(out_dir) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, out_dir)

    monkeypatch.setattr(BalanceReport, "write", disk_full)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    args = ["balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", "8", "-q", "--out", str(target)]
    sentence = _one_sentence(runner.invoke(app, args), "No space left on device")
    saved = Path(sentence.split("saved to ")[1].removesuffix(" instead."))
    assert sorted(p.name for p in saved.iterdir()) == ["coactivation.csv", "experts.csv", "layers.csv", "run.json"]


# ----------------------------------------------------------------------------------------- limits (item 5)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("seq_len", ["513", "2048", "100000"])
def test_seq_len_past_the_model_limit_is_refused(seq_len: str, tmp_path: Path, tiny_dir: Any) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    args = ["balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", seq_len, "--out", str(tmp_path / "o")]
    sentence = _one_sentence(runner.invoke(app, args), "maximum positions (512)")
    assert "--seq-len" in sentence and "corpus" not in sentence
    assert _files(tmp_path) == {"c.txt"}


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(("words", "generate"), [(700, 0), (250, 20)])
def test_route_prompt_past_the_model_limit_is_refused(words: int, generate: int, tiny_dir: Any) -> None:
    args = ["route", "x " * words, "-m", str(tiny_dir("mixtral")), "--generate", str(generate)]
    sentence = _one_sentence(runner.invoke(app, args), "more than the model's maximum positions (512)")
    assert ("to generate" in sentence) == bool(generate)


# ------------------------------------------------------------------------------------ --layers (item 6)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(
    ("spec", "needle"),
    [("", "--layers is empty"), (" ", "--layers is empty"), ("3-1", "range 3-1 in --layers is reversed; write 1-3"),
     ("a", "'a' in --layers is not a layer"), ("1,,2", "'' in --layers is not a layer")],
)
def test_bad_layer_selections_are_refused_before_loading(spec: str, needle: str, tiny_dir: Any) -> None:
    _one_sentence(runner.invoke(app, ["route", "hi", "-m", str(tiny_dir("mixtral")), "--layers", spec]), needle)


@pytest.mark.parametrize(("spec", "needle"), [("2,99", "layer(s) 99 with no router"), ("7-9", "7-9 with no router")])
def test_unknown_layers_are_named(spec: str, needle: str, tiny_dir: Any) -> None:
    result = runner.invoke(app, ["route", "hi", "-m", str(tiny_dir("mixtral")), "--layers", spec, "-q"])
    sentence = _one_sentence(result, needle)
    assert "MoE layers are 0-2" in sentence


# -------------------------------------------------------------------------------- capacity factor (item 7)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("factor", ["0", "-1", "nan"])
def test_capacity_factor_must_be_positive(factor: str, tmp_path: Path, tiny_dir: Any) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    args = ["balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", "8", "--capacity-factor", factor,
            "--out", str(tmp_path / "o"), "--plot", str(tmp_path / "p.png")]
    _one_sentence(runner.invoke(app, args), f"must be positive, not {factor}")
    assert _files(tmp_path) == {"c.txt"}


def test_api_capacity_factor_must_be_positive(tiny_dir: Any) -> None:
    import moe_inspect
    from moe_inspect.errors import UserError

    with pytest.raises(UserError, match="must be positive, not 0"):
        moe_inspect.load(str(tiny_dir("mixtral"))).balance("x y z", capacity_factors=(1.0, 0.0))


# ------------------------------------------------------------------------------------ plot format (item 8)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(("name", "needle"), [("x.txt", "extension .txt"), ("x", "no extension"), ("x.jpeg", ".jpeg")])
def test_plot_extension_must_name_a_format(name: str, needle: str, tmp_path: Path, tiny_dir: Any) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    before = _files(tmp_path)
    args = ["balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--plot", str(tmp_path / name)]
    _one_sentence(runner.invoke(app, args), needle)
    assert _files(tmp_path) == before


def test_plot_is_written_in_the_format_its_extension_names(tmp_path: Path, tiny_dir: Any) -> None:
    pytest.importorskip("matplotlib")
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    args = ["balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", "8", "-q"]
    for ext, head in magic.items():
        plot = tmp_path / f"load.{ext}"
        result = runner.invoke(app, [*args, "--plot", str(plot)])
        assert result.exit_code == 0, result.output
        assert plot.read_bytes().startswith(head), ext


# --------------------------------------------------------------------------------------- no network (item 9)


@pytest.mark.parametrize("command", [["route", "hi", "-m"], ["balance", "-", "-m"], ["info"]])
def test_hub_id_without_network_fails_fast(
    command: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not offline, not cached, and the Hub unreachable: one sentence at once instead of five retries."""
    import time

    import moe_inspect.model.source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    moe_inspect.model.source.hub_reachable.cache_clear()
    started = time.perf_counter()
    result = runner.invoke(app, [*command, "someone/not-cached-moe"], input="some text\n")
    moe_inspect.model.source.hub_reachable.cache_clear()
    sentence = _one_sentence(result, "is not in the local Hugging Face cache and the Hub cannot be reached")
    assert "HF_HUB_OFFLINE=1" in sentence
    assert time.perf_counter() - started < 10


# ----------------------------------------------------------------------------------------- help (item 12)


@pytest.mark.parametrize("command", [[], ["route"], ["balance"], ["info"], ["ablate"]])
def test_help_shows_flags_without_values_and_defaults(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    if command == ["balance"]:
        assert "[default: (1, 1.25, 2)]" in result.stdout  # --capacity-factor's default


@pytest.mark.usefixtures("no_model_load")
def test_a_value_after_a_flag_is_named_as_such(tmp_path: Path, tiny_dir: Any) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    result = runner.invoke(app, ["balance", str(corpus), "--lines", "true", "-m", str(tiny_dir("mixtral"))])
    _one_sentence(result, "Corpus file 'true' does not exist; flags take no value.")
