"""Assertions on CLI runs that can fail: CliRunner turns an uncaught exception into exit code 1 with nothing
on the output, so "no 'Traceback' in the output" proves nothing there. Check the exit code, that the runner
caught no exception other than the CLI's own exit, and that a user error is one sentence on stderr."""

from __future__ import annotations

from typing import Any


def assert_no_exception(result: Any, exit_code: int = 0) -> None:
    """The command ended through its own exit path with ``exit_code``, not through an exception."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"the command raised {result.exception!r}",
        result.output,
    )
    assert result.exit_code == exit_code, (result.exit_code, result.output)


def assert_one_line_error(result: Any, needle: str, exit_code: int = 2, after_load: bool = False) -> str:
    """Exit 2 (by default), no exception, and the error as ONE last stderr line 'Error: ... .' with ``needle``.

    Before it, only the loader's status lines (``after_load``: the error came after the model loaded).
    """
    assert_no_exception(result, exit_code)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    error = lines[-1]
    assert error.startswith("Error: ") and error.rstrip().endswith("."), lines
    assert needle in error, (needle, error)
    assert len(lines) == 1 or after_load, lines
    assert not [line for line in lines[:-1] if "Error" in line or "Traceback" in line], lines
    assert "Traceback" not in result.output
    return error


def assert_usage_error(result: Any, needle: str) -> None:
    """An option rejected while parsing: Click's usage block (several lines), exit 2, no exception."""
    assert_no_exception(result, 2)
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.output
