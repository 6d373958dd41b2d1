"""The `info` panel: what the architecture is, how big it is, and how much of it one token uses."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from moe_inspect.analysis.model_info import ModelInfo
from moe_inspect.units import human_bytes, human_count, layer_ranges


def _layers_line(info: ModelInfo) -> str:
    if info.stacks:  # encoder-decoder: each stack's blocks
        return "; ".join(
            f"{s.stack} {s.num_layers} ({len(s.moe_layers)} MoE: {layer_ranges(s.moe_layers) or '-'}, "
            f"{len(s.dense_layers)} dense)"
            for s in info.stacks
        )
    if not info.moe_layers:
        return f"{info.num_layers} (all dense)"
    parts = [f"{len(info.moe_layers)} MoE: {layer_ranges(info.moe_layers)}"]
    if info.dense_layers:
        parts.append(f"{len(info.dense_layers)} dense: {layer_ranges(info.dense_layers)}")
    return f"{info.num_layers} ({'; '.join(parts)})"


def _experts_line(info: ModelInfo) -> str:
    """One phrase when every MoE layer agrees; otherwise one phrase per distinct (E, k) with its layers."""
    moe = [entry for entry in info.layers if entry.kind == "moe"]
    if not moe:
        return "none: dense model (0 routed experts)"
    groups: dict[tuple[int, int], list[int]] = {}
    for entry in moe:
        groups.setdefault((entry.experts, entry.top_k), []).append(entry.layer)
    if len(groups) == 1:
        (experts, k), _ = next(iter(groups.items()))
        return f"{experts} routed, top-{k} per token"
    return "; ".join(
        f"{experts} routed, top-{k} (layer{'s' if len(layers) > 1 else ''} {layer_ranges(layers)})"
        for (experts, k), layers in groups.items()
    )


def _shared_line(info: ModelInfo) -> str:
    counts = sorted({entry.shared_experts for entry in info.layers if entry.kind == "moe"})
    if not counts or counts == [0]:
        return "none"
    return f"{'/'.join(map(str, counts))} per MoE layer, used by every token"


def _share(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}%" if total else "-"


def render_info(info: ModelInfo, console: Console) -> None:
    """Print the panel; numbers use model-card units (46.70 B) and memory binary GiB, both labelled."""
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold", no_wrap=True)
    header.add_column(overflow="fold")
    header.add_row("Model type", f"{info.model_type}  ({info.model_class})")
    header.add_row("Layers", _layers_line(info))
    header.add_row("Routed experts", _experts_line(info))
    header.add_row("Shared experts", _shared_line(info))
    header.add_row("Routing", info.routing_rule)

    params = Table(title="Parameters", title_justify="left", header_style="bold", expand=False)
    params.add_column("")
    params.add_column("count", justify="right", no_wrap=True)
    params.add_column("exact", justify="right", style="dim")
    params.add_column("of total", justify="right")
    total = info.total_params
    params.add_row("Total", human_count(total), f"{total:,}", "100%")
    params.add_row(
        "Routed experts", human_count(info.routed_expert_params), f"{info.routed_expert_params:,}",
        _share(info.routed_expert_params, total),
    )
    # Publishers count "active" three ways; each row names its convention.
    active_rows = (
        ("Active per token (all weights)", info.active_params, "bold"),
        ("Active, excl. input embedding", info.active_params_excl_input_embedding, ""),
        ("Active, non-embedding", info.active_params_non_embedding, ""),
    )
    for label, count, style in active_rows:
        params.add_row(label, human_count(count), f"{count:,}", _share(count, total), style=style)
    if info.tied_embeddings:
        params.add_row("Embedding = LM head (tied)", human_count(info.input_embedding_params), "", "", style="dim")
    else:
        params.add_row("Input embedding", human_count(info.input_embedding_params), "", "", style="dim")
        params.add_row("LM head", human_count(info.lm_head_params), "", "", style="dim")
    params.add_row("Activation ratio", f"{100 * info.activation_ratio:.2f}%", "", "")

    memory = Table(title="Weight memory", title_justify="left", header_style="bold")
    memory.add_column("dtype")
    memory.add_column("all weights", justify="right")
    memory.add_column("active per token", justify="right")
    for dtype, sizes in info.memory.items():
        memory.add_row(dtype, human_bytes(sizes["all"]), human_bytes(sizes["active"]))

    active_note = Text(
        "Active counts: all weights a token uses, embedding and LM head included; then without the input "
        "embedding (a lookup reads one row); then without embedding and LM head (Kaplan et al.'s N, the "
        "non-embedding convention some model cards use).",
        style="dim",
    )
    memory_note = Text(
        "GiB = 2^30 bytes. Weights only: no KV cache, activations or quantization scales.", style="dim"
    )
    parts: list[object] = [header, Text(""), params, active_note, Text(""), memory, memory_note]
    if info.load_footprint:  # what each loading mode holds (moe_inspect.model.footprint.predicted_footprints)
        modes = " · ".join(f"{mode} {human_bytes(n)}" for mode, n in info.load_footprint.items())
        parts.append(Text(f"Loaded, experts quantized too, scales included: {modes}", style="dim"))
    for note in info.notes:
        parts.append(Text(f"Note: {note}", style="dim"))
    title = f"[bold]{info.model_type}[/bold]: {'MoE' if info.moe_layers else 'dense'}"
    console.print(Panel(Group(*parts), title=title, title_align="left", expand=False))
