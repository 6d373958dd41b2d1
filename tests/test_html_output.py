"""`--html` as an output file like the others: checked before the model loads, written atomically with the
umask's mode, and in the --json document's company (the browser checks of the pages are in test_html_reports)."""

from __future__ import annotations

import importlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moe_inspect.cli import app

runner = CliRunner()
TEXT = "def add(a, b):\n    return a + b\n" * 20


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    for command in ("balance", "route", "compare", "ablate"):
        monkeypatch.setattr(importlib.import_module(f"moe_inspect.cli.{command}"), "load_for_cli", refuse)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(
    "command", [["balance", "{c}"], ["route", "hi"], ["info"], ["compare", "{c}"], ["ablate", "{c}", "--top-k", "1"]]
)
def test_html_that_is_a_folder_is_refused_before_any_work(command: list[str], tmp_path: Path, tiny_dir: Any) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    args = [a.replace("{c}", str(corpus)) for a in command] + ["--html", str(tmp_path)]
    result = runner.invoke(app, [*args, *([] if command == ["info"] else ["-m", str(tiny_dir("mixtral"))])])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"Error: --html {tmp_path} is a folder; name a file."


def test_html_reports_honour_the_umask_beside_the_json_document(tmp_path: Path, tiny_dir: Any) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    model = str(tiny_dir("mixtral"))
    previous = os.umask(0o027)
    try:
        balance = runner.invoke(
            app,
            ["balance", str(corpus), "-m", model, "--seq-len", "8", "--top-tokens", "2", "--min-count", "1",
             "--json", "--out", str(tmp_path / "out"), "--html", str(tmp_path / "out" / "balance.html")],
        )
        route = runner.invoke(app, ["route", "hello", "-m", model, "-q", "--html", str(tmp_path / "route.html")])
        info = runner.invoke(app, ["info", model, "-q", "--html", str(tmp_path / "info.html")])
    finally:
        os.umask(previous)
    for result in (balance, route, info):
        assert result.exit_code == 0, result.output
    document = json.loads(balance.stdout)  # one document: the status lines went to stderr
    assert set(document) == {"run", "layers", "experts", "coactivation", "expert_tokens"}
    assert document["expert_tokens"] and "vocab_specialization" in document["layers"][0]
    pages = [tmp_path / "out" / "balance.html", tmp_path / "route.html", tmp_path / "info.html"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in pages} == {p.name: 0o640 for p in pages}
    assert all(p.read_text(encoding="utf-8").startswith("<!DOCTYPE html>") for p in pages)
    # The --out set kept the report written into its folder, and nothing temporary is left anywhere.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "balance.html", "coactivation.csv", "expert_tokens.csv", "experts.csv", "layers.csv", "run.json"
    ]
    assert not [p for p in tmp_path.rglob(".*")]
