"""The one progress bar of balance and ablate: same columns, transient, on stderr, off with --quiet and off rank 0."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tiny_models import SAMPLE_TEXT
from typer.testing import CliRunner

from moe_inspect.cli import app, progress
from moe_inspect.cli.common import err


def test_the_bar_looks_and_behaves_the_same_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    bar = progress.progress_bar("routing", "{task.fields[tokens]:,} tokens", quiet=False)
    assert [type(c) for c in bar.columns] == [
        TextColumn, BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    ]
    texts = [bar.columns[0].text_format, bar.columns[3].text_format]
    assert texts == ["[bold]routing", "{task.fields[tokens]:,} tokens"]
    assert bar.console is err and err.stderr  # never on stdout, which carries the results
    assert bar.live.transient and not bar.disable
    assert progress.progress_bar("routing", "", quiet=True).disable
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # a torchrun rank other than the main one draws nothing
    assert progress.progress_bar("routing", "", quiet=False).disable
    monkeypatch.setenv("RANK", "0")
    assert not progress.progress_bar("routing", "", quiet=False).disable


@pytest.mark.parametrize("quiet", [False, True])
def test_balance_and_ablate_draw_it(quiet: bool, tiny_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, bool]] = []
    real = progress.progress_bar

    def spy(label: str, detail: str, *, quiet: bool):
        made.append((label, quiet))
        return real(label, detail, quiet=quiet)

    monkeypatch.setattr(progress, "progress_bar", spy)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    common = [str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", "16", "--max-tokens", "32", "--json"]
    for command in (["balance"], ["ablate", "--top-k", "1"]):
        result = CliRunner().invoke(app, [*command, *common, *(["--quiet"] if quiet else [])])
        assert result.exit_code == 0, result.output
    assert made == [("routing", quiet), ("ablating", quiet)]
