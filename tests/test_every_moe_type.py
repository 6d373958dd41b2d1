"""Every MoE model type the installed transformers registers for generation either routes or is refused (issue 17).

Fails when a new MoE type appears (a transformers upgrade) that no test routes and the registry does not refuse
with one sentence: then add it to a tiny-model test, or to ``families.REFUSED`` with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import moe_families, train_tiny_tokenizer
from tiny_seq2seq_vl import SEQ2SEQ_TYPES, VL_TYPES, checkpoint_moe_types
from typer.testing import CliRunner

from moe_inspect.cli import app
from moe_inspect.errors import UserError
from moe_inspect.model.families import REFUSED

ROUTED_ELSEWHERE = {
    **{t: "tests/test_all_families.py" for t in moe_families()},
    **{t: "tests/test_vision_language.py" for t in VL_TYPES},
    **{t: "tests/test_encoder_decoder.py" for t in SEQ2SEQ_TYPES},
}
TYPES = checkpoint_moe_types()


def _covered(model_type: str) -> bool:
    """Routed by a test, or a causal-LM type whose ``_text`` twin (same routers, same causal class) is."""
    if model_type in ROUTED_ELSEWHERE:
        return True
    return f"{model_type}_text" in ROUTED_ELSEWHERE and "CAUSAL_LM" in TYPES[model_type]


def test_discovery_sees_all_kinds() -> None:
    kinds = {kind for found in TYPES.values() for kind in found}
    assert {"CAUSAL_LM", "IMAGE_TEXT_TO_TEXT", "SEQ_TO_SEQ_CAUSAL_LM"} <= kinds
    assert len(TYPES) >= 70, len(TYPES)
    for name in ("mixtral", "qwen3_vl_moe", "switch_transformers", "nllb-moe", "llama4", "ernie4_5_vl_moe"):
        assert name in TYPES


@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_every_type_routes_or_is_refused(model_type: str) -> None:
    routed, refused = _covered(model_type), model_type in REFUSED
    assert routed or refused, f"{model_type} ({', '.join(TYPES[model_type])}) is neither routed by a test nor refused"
    assert not (routed and refused), f"{model_type} is routed by a test but still refused"


def test_refusals_are_one_sentence_each() -> None:
    for model_type, reason in REFUSED.items():
        assert model_type in TYPES, f"stale refusal: transformers no longer registers {model_type}"
        assert reason and not reason.endswith(".") and ". " not in reason, reason


def test_loader_refuses_in_one_sentence(tmp_path: Path) -> None:
    from transformers import CONFIG_MAPPING

    import moe_inspect

    refused = min(REFUSED)
    CONFIG_MAPPING[refused]().save_pretrained(tmp_path)  # a config alone: refused before any weight is read
    train_tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UserError) as caught:
        moe_inspect.load(str(tmp_path))
    message = str(caught.value)
    assert message == f"moe-inspect cannot route '{refused}' checkpoints yet: {REFUSED[refused]}."
    result = CliRunner().invoke(app, ["route", "hi", "-m", str(tmp_path)])
    assert result.exit_code == 2
    assert f"cannot route '{refused}'" in result.output and "Traceback" not in result.output
