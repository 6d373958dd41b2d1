"""The package tree draws the data flow: each stage imports only the stages below it.

metrics and io (formats: schemas, export, corpus, engine records) sit at the bottom, then model (source,
loading, routers, capture), analysis (accumulate, balance, compare, ablate, placement), render, and the thin
cli and api on top. A stage importing one above it is a loop in the flow, caught here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_inspect"
# Each stage and the stages it may import (besides itself). errors and units are shared by all.
ALLOWED = {
    "metrics": set(),
    "io": set(),
    "model": {"metrics", "io"},
    "analysis": {"metrics", "io", "model"},
    "render": {"metrics", "io", "model", "analysis"},
    "cli": {"metrics", "io", "model", "analysis", "render", "api"},
    "api": {"metrics", "io", "model", "analysis"},
}
SHARED = {"errors", "units", ""}


def stage_of(module: str) -> str:
    """'moe_inspect.model.loading' -> 'model'; 'moe_inspect.api' -> 'api'; 'moe_inspect' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path) -> set[str]:
    """Every moe_inspect module this file imports, also inside functions (the CLI imports lazily)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_inspect"):
            found.add(node.module)
            if node.module == "moe_inspect":
                names = [alias.name for alias in node.names]  # modules only, not __version__
                found.update(f"moe_inspect.{n}" for n in names
                             if (PACKAGE / f"{n}.py").exists() or (PACKAGE / n).is_dir())
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("moe_inspect"))
    return found


def modules() -> list[Path]:
    top = {PACKAGE / "__init__.py", PACKAGE / "__main__.py"}
    return sorted(p for p in PACKAGE.rglob("*.py") if p not in top)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up(path: Path) -> None:
    own = stage_of("moe_inspect." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    upward = sorted(
        name for name in imports(path)
        if stage_of(name) not in SHARED | {own} | ALLOWED[own]
    )
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports {upward}"


def test_flat_package_holds_only_the_entry_points() -> None:
    """New modules go into a stage; only these stay at the top."""
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "api.py", "errors.py", "units.py"]
