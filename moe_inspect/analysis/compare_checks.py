"""Refusals before and after loading: two models are compared only if they read the same tokens with the same MoE
shapes."""

from __future__ import annotations

from typing import Any

from moe_inspect.errors import UserError
from moe_inspect.model.routers import RouterSpec


def check_same_tokenizer(tokenizer_a: Any, tokenizer_b: Any) -> None:
    """Both models must read the same token ids: their vocabularies must be identical."""
    if tokenizer_a.get_vocab() != tokenizer_b.get_vocab():
        raise UserError(
            f"The two models use different tokenizers ({len(tokenizer_a.get_vocab()):,} vs "
            f"{len(tokenizer_b.get_vocab()):,} tokens, or different ids), so they cannot read the same tokens."
        )


def check_decoder_only(routers: list[RouterSpec], what: str) -> None:
    """Output drift and loss are next-token figures of a decoder-only model: refuse an encoder-decoder's routers."""
    if any(spec.stack == "encoder" for spec in routers):
        raise UserError(
            f"{what} reads next-token outputs of decoder-only models; encoder-decoders (Switch Transformers, "
            "NLLB-MoE) are not supported, so use `balance` or `route` on them."
        )


def check_same_moe(routers_a: list[RouterSpec], routers_b: list[RouterSpec]) -> None:
    """Same MoE layers in the same order, each with the same E, k and distribution width."""
    if len(routers_a) != len(routers_b):
        raise UserError(
            f"Model A has {len(routers_a)} MoE routers and model B has {len(routers_b)}, so their layers cannot be "
            "compared."
        )
    for a, b in zip(routers_a, routers_b, strict=True):
        if (a.layer, a.kind, a.num_experts, a.top_k, a.num_columns) != (
            b.layer,
            b.kind,
            b.num_experts,
            b.top_k,
            b.num_columns,
        ):
            raise UserError(
                f"MoE layer {a.layer} differs: model A has {a.num_experts} experts, top-{a.top_k} there and model B "
                f"(layer {b.layer}) has {b.num_experts} experts, top-{b.top_k}."
            )


def precheck_same_moe(
    model_a: str, model_b: str, revision_a: str | None, revision_b: str | None, trust_remote_code: bool
) -> None:
    """From the two configs alone (meta device, no weights): refuse different MoE shapes before A's pass.

    Best effort: a config this cannot describe is left to ``check_same_moe`` once model B is loaded.
    """
    if (model_a, revision_a) == (model_b, revision_b):
        return
    from moe_inspect.analysis.info import describe
    from moe_inspect.model.source import load_config

    shapes = []
    for model, revision in ((model_a, revision_a), (model_b, revision_b)):
        try:
            info = describe(load_config(model, revision, trust_remote_code), trust_remote_code=trust_remote_code)
        except Exception:  # the loaded models are checked later anyway
            return
        shapes.append([(r.layer, r.kind, r.experts, r.top_k) for r in info.routers])
    if len(shapes[0]) != len(shapes[1]):
        raise UserError(
            f"Model A has {len(shapes[0])} MoE routers and model B has {len(shapes[1])}, so their layers cannot be "
            "compared."
        )
    for a, b in zip(*shapes, strict=True):
        if a != b:
            raise UserError(
                f"MoE layer {a[0]} differs: model A has {a[2]} experts, top-{a[3]} there and model B "
                f"(layer {b[0]}) has {b[2]} experts, top-{b[3]}."
            )
