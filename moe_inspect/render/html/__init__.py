"""Self-contained HTML reports: one file per run, inline styles, script and data, readable without script.

Each report is built as a string by its own module and written atomically by ``write_html``.
"""

from __future__ import annotations

from pathlib import Path

from moe_inspect.io.export import write_text
from moe_inspect.render.html.ablate import ablate_html
from moe_inspect.render.html.balance import balance_html
from moe_inspect.render.html.compare import compare_html
from moe_inspect.render.html.info import info_html
from moe_inspect.render.html.route import route_html

__all__ = ["ablate_html", "balance_html", "compare_html", "info_html", "route_html", "write_html"]


def write_html(page: str, path: str | Path) -> Path:
    """Write ``page`` atomically (a reader never sees half a report), its mode from the umask like every output."""
    return write_text(page, path)
