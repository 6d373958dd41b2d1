"""`ablate`: the language-model loss under routing changes, each against the unchanged model on the same batches.

Batches are read once. For each batch the baseline runs first, then every setting, then every expert removal
of ``importance``, then the gradient pass, so all figures share exactly the same tokens. Losses come from
``analysis.outputs.token_losses`` (decoder once, head on chunks of positions, no [B, S, V] logits) and stay
on the device as float64 sums until the end. A batch is atomic: its losses, drop counts, importance proxies
and gradient figures are all committed together once all its passes ran, so Ctrl-C (even inside a pass)
leaves every table at exactly the finished batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_inspect.analysis.gradients import GradientAccumulator
from moe_inspect.analysis.importance import ProxyAccumulator, importance_frame, proxy_spearman
from moe_inspect.analysis.interrupts import interrupts_deferred
from moe_inspect.analysis.interventions import Rerouter, RoutingChange, reroutable_routers
from moe_inspect.analysis.outputs import OutputHead, predicted_positions, token_losses
from moe_inspect.analysis.run_info import environment, model_identity
from moe_inspect.errors import UserError
from moe_inspect.io.corpus import Batch
from moe_inspect.io.export import replace_folder, write_csv, write_json
from moe_inspect.io.schemas import ABLATION, ABLATION_LAYERS
from moe_inspect.model.loading import LoadedModel

#: progress(batch, passes done in this batch, passes per batch)
Progress = Callable[[Batch, int, int], None]


@dataclass
class AblationReport:
    """The tables of ``schemas`` (ABLATION, ABLATION_LAYERS, IMPORTANCE, GRADIENTS) and run.json."""

    ablation: pd.DataFrame
    layers: pd.DataFrame
    importance: pd.DataFrame | None = None
    gradients: pd.DataFrame | None = None
    spearman: pd.DataFrame | None = None  # per layer, each proxy's rank correlation with the removal delta
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return bool(self.run.get("partial"))

    def write(self, out_dir: str | Path) -> list[Path]:
        """ablation.csv, ablation_layers.csv (importance.csv, gradients.csv) and run.json, swapped in as one set."""

        def write_all(out: Path) -> list[Path]:
            written = [
                write_csv(self.ablation, out / "ablation.csv"), write_csv(self.layers, out / "ablation_layers.csv")
            ]
            if self.importance is not None:
                written.append(write_csv(self.importance, out / "importance.csv"))
            if self.gradients is not None:
                written.append(write_csv(self.gradients, out / "gradients.csv"))
            written.append(write_json(self.run, out / "run.json"))
            return written

        return replace_folder(out_dir, write_all)


@dataclass
class AblationPlan:
    """What one run measures; ``passes_per_batch`` is the cost stated before starting."""

    changes: list[RoutingChange]
    importance_layers: list[int] = field(default_factory=list)
    gradients: bool = False

    def removals(self, experts_per_layer: dict[int, int]) -> list[tuple[int, int]]:
        return [(layer, e) for layer in self.importance_layers for e in range(experts_per_layer[layer])]

    def passes_per_batch(self, experts_per_layer: dict[int, int]) -> int:
        """Decoder passes per batch: baseline + settings + one per removed expert (+ a forward-backward)."""
        return 1 + len(self.changes) + len(self.removals(experts_per_layer)) + int(self.gradients)


def check_plan(loaded: LoadedModel, plan: AblationPlan) -> None:
    """Refuse, before any model pass, what cannot be measured honestly."""
    if plan.changes or plan.importance_layers:
        reroutable_routers(loaded.routers, loaded.model_type)
    layers = {spec.layer for spec in loaded.routers}
    for layer in plan.importance_layers:
        if layer not in layers:
            raise UserError(f"Layer {layer} has no router: importance needs MoE layers ({sorted(layers)}).")
    labels = [change.label for change in plan.changes]
    if len(set(labels)) != len(labels):
        raise UserError("Each setting may be given only once.")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens only, as in balance, so left padding works for absolute position embeddings.
    return (mask.cumsum(-1) - 1).clamp_min(0)


def run_ablation(
    loaded: LoadedModel,
    batches: Iterable[Batch],
    plan: AblationPlan,
    progress: Progress | None = None,
    run_info: dict[str, Any] | None = None,
) -> AblationReport:
    """Measure ``plan`` over ``batches``; Ctrl-C returns the batches completed so far (``partial``)."""
    check_plan(loaded, plan)
    model, routers = loaded.model, loaded.routers
    head = OutputHead(model)
    experts_per_layer = {spec.layer: spec.num_experts for spec in routers}
    removals = plan.removals(experts_per_layer)
    passes = plan.passes_per_batch(experts_per_layer)
    reroutes = [Rerouter(routers, change) for change in plan.changes]
    removal_reroutes = [
        Rerouter(routers, RoutingChange(label=f"{layer}:{e}", removed=frozenset({(layer, e)}))) for layer, e in removals
    ]
    chosen = [spec for spec in routers if spec.layer in set(plan.importance_layers)]
    proxies = ProxyAccumulator(model, chosen) if chosen else None
    grads = GradientAccumulator(model, routers) if plan.gradients else None
    device = loaded.input_device
    sums: torch.Tensor | None = None  # (1 + settings + removals,) float64 on the device
    tokens = predicted = batches_done = 0
    partial = False
    started = time.perf_counter()
    try:
        for batch in batches:
            ids = batch.input_ids.to(device, non_blocking=True)
            mask = batch.attention_mask.to(device, non_blocking=True)
            positions = _positions(batch.attention_mask).to(device, non_blocking=True)
            # Counted on the host from the CPU mask: no device sync per batch.
            count = int(predicted_positions(batch.attention_mask).sum())
            batch_sums = []
            with torch.inference_mode():
                if proxies is not None:
                    proxies.begin_batch(batch.attention_mask)
                    with proxies.active():
                        loss = token_losses(head, head.decode(ids, mask, positions))[0]
                else:
                    loss = token_losses(head, head.decode(ids, mask, positions))[0]
                batch_sums.append(loss)
                for done, rerouter in enumerate([*reroutes, *removal_reroutes], start=2):
                    rerouter.begin_batch(batch.attention_mask)
                    with rerouter.active():
                        batch_sums.append(token_losses(head, head.decode(ids, mask, positions))[0])
                    if progress is not None and done < passes:
                        progress(batch, done, passes)
            if grads is not None:
                with grads.active(mask):
                    grad_loss = token_losses(head, head.decode(ids, mask, positions))[0]
                    if count:
                        (grad_loss / count).backward()
            stacked = torch.stack(batch_sums)
            with interrupts_deferred():  # the batch counts in every figure, or (Ctrl-C before here) in none
                for rerouter in [*reroutes, *removal_reroutes]:
                    rerouter.end_batch()
                if proxies is not None:
                    proxies.end_batch()
                if grads is not None:
                    grads.add_batch(count)
                sums = stacked if sums is None else sums + stacked
                predicted += count
                tokens += batch.tokens
                batches_done += 1
            if progress is not None:
                progress(batch, passes, passes)
    except KeyboardInterrupt:
        partial = True
    elapsed = time.perf_counter() - started
    values = sums.cpu().tolist() if sums is not None else [math.nan] * (1 + len(reroutes) + len(removals))
    losses = [v / predicted if predicted else math.nan for v in values]
    base = losses[0]
    ablation, layers = _ablation_frames(routers, plan.changes, reroutes, losses[: 1 + len(reroutes)], predicted)
    importance = spearman = None
    if proxies is not None:
        deltas = {key: loss - base for key, loss in zip(removals, losses[1 + len(reroutes) :], strict=True)}
        importance = importance_frame(deltas, proxies.frames())
        spearman = proxy_spearman(importance)
    run = {
        **model_identity(loaded),
        "tokens": tokens,
        "predicted_tokens": predicted,
        "batches": batches_done,
        "settings": [change.label for change in plan.changes],
        "importance_layers": plan.importance_layers,
        "gradients": plan.gradients,
        "passes_per_batch": passes,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "partial": partial,
        "routers": [spec.describe() for spec in routers],
        **environment(),
        **(run_info or {}),
    }
    if spearman is not None:
        run["importance_spearman"] = spearman.to_dict(orient="records")
    return AblationReport(
        ablation=ablation,
        layers=layers,
        importance=importance,
        gradients=grads.frame() if grads is not None else None,
        spearman=spearman,
        run=run,
    )


def _ablation_frames(
    routers: list[Any], changes: list[RoutingChange], reroutes: list[Rerouter], losses: list[float], predicted: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    base = losses[0]
    rows = [_row("baseline", "", base, base, predicted, 0.0)]
    layer_rows = []
    all_layers = sorted({spec.layer for spec in routers})
    for change, rerouter, loss in zip(changes, reroutes, losses[1:], strict=True):
        touched = sorted({spec.layer for spec in routers if change.touches(spec)})
        layers_text = "all" if touched == all_layers else ",".join(map(str, touched))
        counts = rerouter.drop_counts()
        dropped = sum(d for d, _ in counts.values())
        assigned = sum(a for _, a in counts.values())
        rows.append(_row(change.label, layers_text, loss, base, predicted, dropped / assigned if assigned else 0.0))
        k_of = {spec.index: change.k_for(spec) for spec in routers}
        for spec in routers:
            if spec.index in counts:
                d, a = counts[spec.index]
                layer_rows.append(
                    {"setting": change.label, "layer": spec.layer, "drop_rate": d / a if a else 0.0,
                     "tokens": a // k_of[spec.index]}
                )
    ablation = pd.DataFrame(rows, columns=ABLATION.names).astype(ABLATION.dtypes)
    layers = pd.DataFrame(layer_rows, columns=ABLATION_LAYERS.names).astype(ABLATION_LAYERS.dtypes)
    return ablation, layers


def _row(setting: str, layers: str, loss: float, base: float, predicted: int, drop_rate: float) -> dict[str, Any]:
    delta = loss - base
    return {
        "setting": setting,
        "layers": layers,
        "loss": loss,
        "perplexity": math.exp(loss) if loss == loss else math.nan,
        "delta_loss": delta,
        "rel_delta": delta / base if base else math.nan,
        "tokens": predicted,
        "drop_rate": drop_rate,
    }


def num_layers(model: Any) -> int:
    """Decoder layers, for refusing LAYER:EXPERT items beyond the model."""
    config = model.config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UserError("The model's config does not say how many layers it has.")
    return count


def build_plan(
    loaded: LoadedModel,
    *,
    top_k: Iterable[int] = (),
    dense: bool = False,
    drop_experts: Iterable[str] = (),
    capacity_factors: Iterable[float] = (),
    drop_policy: str = "position",
    importance: bool = False,
    layers: Iterable[int] | None = None,
    gradients: bool = False,
) -> AblationPlan:
    """Validate every requested setting against the model (one sentence on the first bad one), no pass run."""
    from moe_inspect.analysis import interventions as iv
    from moe_inspect.analysis.compare_checks import check_decoder_only

    check_decoder_only(loaded.routers, "ablate")
    routers = loaded.routers
    changes: list[RoutingChange] = [iv.top_k_change(k, routers) for k in top_k]
    if dense:
        changes.append(iv.dense_change())
    count = num_layers(loaded.model)
    changes += [iv.removal_change(spec, routers, count) for spec in drop_experts]
    changes += [iv.capacity_change(cf, drop_policy) for cf in capacity_factors]  # type: ignore[arg-type]
    moe = sorted({spec.layer for spec in routers})
    chosen: list[int] = []
    if importance:
        chosen = moe if layers is None else sorted(set(layers))
        for layer in chosen:
            if not 0 <= layer < count:
                raise UserError(f"Layer {layer} does not exist: the model has {count} layers (0-{count - 1}).")
            if layer not in moe:
                raise UserError(f"Layer {layer} is a dense layer: it has no experts to rank.")
    plan = AblationPlan(changes=changes, importance_layers=chosen, gradients=gradients)
    check_plan(loaded, plan)
    return plan
