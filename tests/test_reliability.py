"""Reliability as a new user meets it (issue 10), through the real command line in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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


def _report(tag: str) -> Any:
    import pandas as pd

    from moe_inspect.analysis.balance import BalanceReport

    frame = pd.DataFrame({"run": [tag]})
    return BalanceReport(layers=frame, experts=frame, coactivation=frame, run={"tag": tag})


def _tags(folder: Path) -> set[str]:
    """Which runs the files in ``folder`` come from."""
    import pandas as pd

    tags = {pd.read_csv(folder / name)["run"][0] for name in ("layers.csv", "experts.csv", "coactivation.csv")}
    return tags | {json.loads((folder / "run.json").read_text())["tag"]}


def test_a_reader_never_sees_files_of_two_runs(tmp_path: Path, monkeypatch: Any) -> None:
    """While run B writes, the folder still holds all of run A; afterwards all of B; other files stay."""
    import moe_inspect.analysis.balance

    out = tmp_path / "out"
    _report("A").write(out)
    (out / "load.png").write_bytes(b"png")
    seen: list[set[str]] = []
    real = moe_inspect.analysis.balance.write_json

    def watching(data: Any, path: Any) -> Any:
        seen.append(_tags(out))  # B's CSVs are written by now; the reader must still see A alone
        return real(data, path)

    monkeypatch.setattr(moe_inspect.analysis.balance, "write_json", watching)
    written = _report("B").write(out)
    assert seen == [{"A"}]
    assert _tags(out) == {"B"}
    assert (out / "load.png").read_bytes() == b"png"
    assert sorted(p.name for p in written) == ["coactivation.csv", "experts.csv", "layers.csv", "run.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left beside it


def test_output_files_honour_the_umask(tmp_path: Path, tiny_dir: Any) -> None:
    """CSV, run.json, PNG and the route CSV are 0644 under umask 022, like files of any other tool."""
    import stat

    from typer.testing import CliRunner

    from moe_inspect.cli import app

    corpus = tmp_path / "c.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 20)
    model = str(tiny_dir("mixtral"))
    previous = os.umask(0o022)
    try:
        runner = CliRunner()
        result = runner.invoke(app, ["balance", str(corpus), "-m", model, "--seq-len", "8", "-q",
                                     "--out", str(tmp_path / "out"), "--plot", str(tmp_path / "load.png")])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["route", "hello", "-m", model, "-q", "--csv", str(tmp_path / "r.csv")])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*tmp_path.iterdir(), *(tmp_path / "out").iterdir()]}
    modes.pop("c.txt")
    assert modes == {
        "out": 0o755, "load.png": 0o644, "r.csv": 0o644, "layers.csv": 0o644, "experts.csv": 0o644,
        "coactivation.csv": 0o644, "run.json": 0o644,
    }


def test_control_characters_are_escaped_in_the_table_but_exact_in_the_csv(tmp_path: Path, tiny_dir: Any) -> None:
    import pandas as pd
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    prompt = "a\x1b[31mred\x00b"
    csv = tmp_path / "r.csv"
    result = CliRunner().invoke(app, ["route", "-", "-m", str(tiny_dir("mixtral")), "--csv", str(csv)], input=prompt)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x00" not in result.stdout
    assert "\\x1b" in result.stdout and "\\x00" in result.stdout
    tokens = "".join(pd.read_csv(csv, keep_default_na=False).drop_duplicates("position")["token"])
    assert "\x1b" in tokens and "\x00" in tokens


def test_partial_utf8_tokens_show_their_bytes(tmp_path: Path, tiny_dir: Any) -> None:
    """Byte-level BPE splits CJK and emoji into byte tokens that all decode to U+FFFD; their bytes tell them apart."""
    import pandas as pd
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    csv = tmp_path / "r.csv"
    prompt = "林檎 🍎"
    result = CliRunner().invoke(app, ["route", prompt, "-m", str(tiny_dir("mixtral")), "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    assert "<E6>" in result.stdout and "<9E>" in result.stdout and "<F0>" in result.stdout
    assert "\ufffd" not in result.stdout
    frame = pd.read_csv(csv, keep_default_na=False).drop_duplicates("position")
    raw = b"".join(bytes.fromhex(h.strip("<>")) for h in frame["token_bytes"])
    assert raw == prompt.encode("utf-8")  # the tokens' bytes are exactly the prompt's
    assert list(frame["token_bytes"][:3]) == ["<E6>", "<9E>", "<97>"]  # 林 = E6 9E 97, one byte per token


def test_byte_fallback_pieces_give_their_byte() -> None:
    from moe_inspect.io.tokens import _piece_bytes, byte_label

    assert _piece_bytes("<0xE6>") == b"\xe6"
    assert _piece_bytes("Ġthe") == b" the"
    assert _piece_bytes("▁the") is None  # SentencePiece text piece: its decoded text is right
    assert byte_label(b"\xe6\x9d") == "<E6 9D>" and byte_label("林".encode()) is None


def _experts(layers: int = 2, experts: int = 8) -> Any:
    import numpy as np
    import pandas as pd

    rows = []
    ratios = [0.1, 0.3, 0.6, 1.0, 1.5, 3.0, 6.0, 0.0]  # one expert in each bucket, and a dead one
    for layer in range(layers):
        shares = np.array(ratios[:experts]) / experts
        rows += [{"layer": layer, "router": "mlp", "expert": e, "share": s} for e, s in enumerate(shares)]
    return pd.DataFrame(rows)


def test_heatmap_legend_colours_are_distinct_in_16_colours_and_glyphs_without_colour() -> None:
    import re

    from rich.console import Console

    from moe_inspect.render.balance import heatmap

    standard = Console(color_system="standard", width=100, record=True, force_terminal=True)
    standard.print(heatmap(_experts(), 100, standard.color_system))
    legend = standard.export_text(styles=True).splitlines()[-1]
    codes = re.findall(r"\x1b\[([0-9;]+)m█", legend)
    assert len(codes) == 7 and len(set(codes)) == 7, codes  # seven buckets, seven colours

    plain = Console(color_system=None, width=100, record=True)
    plain.print(heatmap(_experts(), 100, plain.color_system))
    text = plain.export_text()
    row = next(line for line in text.splitlines() if line.strip().startswith("L0"))
    assert row.replace(" ", "") == "L0_-:=+*#·"  # one glyph per bucket, then the dead expert
    assert "█" not in text


def test_piped_balance_prints_glyphs(tmp_path: Path, tiny_dir: Any) -> None:
    """Through a pipe (no colour) the heatmap cells are glyphs, not identical blocks."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 20)
    proc = subprocess.run(
        [sys.executable, "-c", MAIN, "balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", "8"],
        capture_output=True, text=True, env=_env(tmp_path), timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "█" not in proc.stdout and "legend: _ < 1/4×" in proc.stdout


def test_heatmap_figure_title_is_never_cut_off() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from moe_inspect.render.balance import heatmap_figure

    title = "/very/long/path/to/a/checkpoint/" * 6 + ": expert load / uniform (log2)"
    fig = heatmap_figure(_experts(), title)
    try:
        fig.canvas.draw()
        box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
        assert "\n" in fig._suptitle.get_text()  # wrapped, not cut
    finally:
        plt.close(fig)


def test_route_title_names_the_selected_layers(tiny_dir: Any) -> None:
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    args = ["route", "hi", "-m", str(tiny_dir("mixtral")), "--layers", "0,2"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "layers 0, 2" in result.stdout and "layers 0-2" not in result.stdout


def test_generate_prints_no_deprecation_warning_and_one_phase_vocabulary(tmp_path: Path, tiny_dir: Any) -> None:
    import pandas as pd

    csv = tmp_path / "r.csv"
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", MAIN, "route", "hello", "-m", str(tiny_dir("mixtral")),
         "--generate", "3", "--csv", str(csv)],
        capture_output=True, text=True, env={**_env(tmp_path), "COLUMNS": "120"}, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" not in proc.stderr and "site-packages" not in proc.stderr, proc.stderr
    phases = set(pd.read_csv(csv, keep_default_na=False)["phase"])
    assert phases == {"prefill", "decode"}
    assert "decode" in proc.stdout and "prefill" in proc.stdout
    assert " gen " not in proc.stdout and " prompt " not in proc.stdout


def test_route_from_stdin_drops_one_trailing_newline(tmp_path: Path, tiny_dir: Any) -> None:
    import pandas as pd
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    csv = tmp_path / "r.csv"
    args = ["route", "-", "-m", str(tiny_dir("mixtral")), "--csv", str(csv), "-q"]
    for text, kept in [("a b\n", "a b"), ("a b\n\n", "a b\n"), ("a b", "a b"), ("a b\r\n", "a b")]:
        assert CliRunner().invoke(app, args, input=text).exit_code == 0
        tokens = pd.read_csv(csv, keep_default_na=False).drop_duplicates("position")["token"]
        assert "".join(tokens).removeprefix("<s>") == kept, text


def test_a_closed_pipe_ends_quietly_with_success(tmp_path: Path, tiny_dir: Any) -> None:
    """`moe-inspect route ... | head`: head exits, the write fails with EPIPE; exit 0 and nothing on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, "route", "hello world", "-m", str(tiny_dir("mixtral")), "-q", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path),
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "Broken pipe" not in stderr, stderr


def test_sigterm_while_writing_leaves_no_temporary_files(tmp_path: Path) -> None:
    """SIGTERM in the middle of writing --out: the old folder stays whole and no staging folder is left."""
    code = f"""
import os, signal, sys
from pathlib import Path
from moe_inspect.cli.common import exit_cleanly_on_sigterm
from moe_inspect.io.export import replace_folder, write_csv
import pandas as pd
exit_cleanly_on_sigterm()
def write(folder):
    path = write_csv(pd.DataFrame({{"a": [1]}}), folder / "layers.csv")
    os.kill(os.getpid(), signal.SIGTERM)
    return [path]
replace_folder(Path({str(tmp_path / "out")!r}), write)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=120, check=False)
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    link = tmp_path / "link"
    _report("A").write(real)
    link.symlink_to(real, target_is_directory=True)
    _report("B").write(link)
    assert link.is_symlink() and _tags(link) == {"B"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
