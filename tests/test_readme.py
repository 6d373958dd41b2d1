"""Every README example that can run offline does run (issue 10, item 16).

Python blocks are executed as they are. Shell lines that call `moe-inspect` run through the CLI in process
unless they need the Hub (a `-m org/name` or `info org/name`) or a pipe; the corpus files they name
(corpus.txt, chats.txt, ...) are small stand-ins made from the held-out samples.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README) if lang == kind]


def _needs_hub(args: list[str]) -> bool:
    model_args = [b for a, b in itertools.pairwise(args) if a in ("-m", "--model")]
    if args[:1] == ["info"] and len(args) > 1:
        model_args.append(args[1])
    return any(HUB_ID.match(m) and not (ROOT / m).exists() for m in model_args)


INLINE = re.compile(r"`(moe-inspect [^`]+)`")


def _commands() -> list[str]:
    """Shell lines of the bash blocks and inline `moe-inspect ...` spans that run offline, each once."""
    lines = [line.split("  #")[0].split("&& ")[-1].strip() for body in _blocks("bash") for line in body.splitlines()]
    lines += [span for span in INLINE.findall(README) if " " in span.removeprefix("moe-inspect ").strip()]
    found = []
    for line in lines:
        if line.startswith("moe-inspect ") and "|" not in line:
            args = shlex.split(line)[1:]
            placeholder = any(a.isalpha() and a.isupper() for a in args)  # headings: `moe-inspect info MODEL`
            if not placeholder and not _needs_hub(args) and line not in found:
                found.append(line)
    return found


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    sample = (ROOT / "fixtures" / "heldout" / "mixed.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    for name in ("corpus.txt", "chats.txt", "code.txt", "prose.txt", "prompt.txt"):
        (tmp_path / name).write_text("".join(sample[:200]), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOE_INSPECT_MODEL", raising=False)
    return tmp_path


def test_the_readme_has_offline_examples() -> None:
    assert len(_commands()) >= 6 and _blocks("python")


@pytest.mark.slow
@pytest.mark.parametrize("line", _commands())
def test_readme_command_runs(line: str, workdir: Path) -> None:
    from moe_inspect.cli import app

    result = CliRunner().invoke(app, shlex.split(line)[1:], env={"COLUMNS": "100"})
    assert result.exit_code == 0, (line, result.output, result.stderr, result.exception)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index: int, workdir: Path) -> None:
    code = _blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
    assert os.path.isdir("runs/demo") or "write(" not in code
