"""`info` on the MoE types issue 17 brought in after the first ten vision-language ones.

Each type's tiny config (the one its routing test loads) is described on the meta device; the figures must be the
real model's: total parameters as built, MoE layers where routers are, towers counted apart from the language model.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model, tiny_config
from tiny_seq2seq_vl import build, generic_vl_config

from moe_inspect.analysis.info import describe
from moe_inspect.model.routers import find_routers

CAUSAL = ("mistral4",)
VISION_LANGUAGE = ("step3p7", "ernie4_5_vl_moe", "glm5_next", "muse_spark", "deepseek_ocr2", "unlimited_ocr")


def _model_and_config(model_type: str) -> tuple[torch.nn.Module, object]:
    if model_type in CAUSAL:
        return build_tiny_model(model_type), tiny_config(model_type)
    return build(model_type), generic_vl_config(model_type)


@pytest.mark.parametrize("model_type", CAUSAL + VISION_LANGUAGE)
def test_info_counts_what_the_model_holds(model_type: str) -> None:
    model, config = _model_and_config(model_type)
    info = describe(config)
    assert info.total_params == sum(p.numel() for p in model.parameters())
    assert info.moe_layers == sorted({spec.layer for spec in find_routers(model)})
    assert (info.num_experts, info.top_k) == (8, 2)
    assert info.active_params < info.total_params
    towers = [name for name, _ in model.model.named_children() if any(w in name for w in ("vision", "visual", "audio"))]
    if model_type in CAUSAL:
        assert not towers and not info.notes
        return
    tower = sum(p.numel() for name in towers for p in getattr(model.model, name).parameters())
    assert f"text tokens use {info.active_params - tower:,}." in " ".join(info.notes)


def test_info_on_qwen3_omni_describes_the_thinker_and_counts_the_speech_parts_apart() -> None:
    from tiny_seq2seq_vl import omni_config

    whole = build("qwen3_omni_moe")
    info = describe(omni_config())
    thinker = whole.thinker
    assert info.total_params == sum(p.numel() for p in thinker.parameters())
    assert info.moe_layers == sorted({spec.layer for spec in find_routers(thinker)})
    towers = sum(p.numel() for tower in (thinker.model.audio_tower, thinker.model.visual) for p in tower.parameters())
    notes = " ".join(info.notes)
    assert f"so text tokens use {info.active_params - towers:,}." in notes
    talker, code2wav = (sum(p.numel() for p in part.parameters()) for part in (whole.talker, whole.code2wav))
    talker_routers = len(find_routers(whole.talker))
    assert talker_routers > 0
    assert (
        f"it also holds talker ({talker:,} parameters, MoE with {talker_routers} routers) and code2wav "
        f"({code2wav:,} parameters), not counted here" in notes
    )
