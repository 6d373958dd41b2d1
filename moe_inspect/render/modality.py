"""The terminal view of a balance run split by modality: each modality's load, and how far image load is from text."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from moe_inspect.io.schemas import router_label

if TYPE_CHECKING:
    from moe_inspect.analysis.balance import BalanceReport


def render_modalities(report: BalanceReport, console: Console, heatmap: Callable[..., Any]) -> None:
    """Each modality's tokens and load heatmap, then the per-layer image-vs-text total-variation distance."""
    layers, experts = report.layers, report.experts
    for name in report.run.get("modalities", []):
        tokens = int(layers[layers["modality"] == name]["tokens"].max())
        console.print(f"[bold]{name}[/bold] tokens: {tokens:,}")
        block = experts[experts["modality"] == name].drop(columns="modality").reset_index(drop=True)
        console.print(heatmap(block, console.width, console.color_system))
    if "image_text_tv" not in layers or layers["image_text_tv"].isna().all():
        return
    per_layer = layers[layers["modality"] == "all"]
    cells = [
        f"L{router_label(int(r.layer), str(r.router))} {r.image_text_tv:.3f}" for r in per_layer.itertuples(index=False)
    ]
    console.print(
        "Image vs text expert load, total-variation distance per layer (0 = same experts, 1 = disjoint): "
        + "  ".join(cells)
    )
