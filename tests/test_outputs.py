"""The chunked head equals the model's own full logits, for every MoE family, with padding and small chunks."""

from __future__ import annotations

import pytest
import torch
from tiny_models import causal_lm_class, moe_families
from transformers import AutoModelForCausalLM

from moe_inspect.analysis.outputs import OutputHead, predicted_positions, token_losses, topk_logprobs

FAMILIES = moe_families()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second sequence
    return ids, mask


@pytest.mark.parametrize("model_type", FAMILIES)
def test_chunked_head_equals_full_logits(model_type: str, tiny_dir) -> None:
    model = causal_lm_class(model_type).from_pretrained(tiny_dir(model_type)).eval()
    ids, mask = _batch()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
        head = OutputHead(model, chunk_bytes=4 * head_vocab(model) * 5)  # 5 positions per chunk: several chunks
        assert head.chunk_positions() == 5
        decoded = head.decode(ids, mask, positions)
        keep = predicted_positions(mask)
        chunked = torch.cat([logits for _keep, logits in head.chunks(decoded, keep)])
        torch.testing.assert_close(chunked, full[keep], rtol=1e-4, atol=1e-4)

        loss, count = token_losses(head, decoded)
        targets = ids[:, 1:][keep[:, :-1]]
        expected = torch.nn.functional.cross_entropy(full[keep], targets, reduction="sum")
        assert int(count) == int(keep.sum()) == 2 * 6 - 2
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)

        values, top_ids, rest, _ = topk_logprobs(head, decoded, k=5)
        reference = torch.log_softmax(full[keep], -1).topk(5, dim=-1)
        torch.testing.assert_close(values, reference.values, rtol=1e-4, atol=1e-4)
        assert torch.equal(top_ids, reference.indices)
        torch.testing.assert_close(rest.exp() + values.exp().sum(-1), torch.ones_like(rest), rtol=1e-4, atol=1e-4)


def head_vocab(model: torch.nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def test_the_model_is_restored_after_chunking(tiny_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("mixtral")).eval()
    decoder = model.model
    head = OutputHead(model)
    ids, mask = _batch()
    with torch.inference_mode():
        decoded = head.decode(ids, mask)
        token_losses(head, decoded)
    assert model.model is decoder
