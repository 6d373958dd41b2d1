"""Passes that need the model's output never materialise more than one chunk of logits.

Measured without timing or RSS noise: a TorchDispatchMode sees every tensor each aten op returns, so the largest
one created during the pass is known exactly. A 151,936-token vocabulary (Qwen's) on a tiny-width model keeps the
reference [B, S, V] logits small enough to compute here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import MixtralConfig, MixtralForCausalLM

from moe_inspect.analysis.outputs import OutputHead, predicted_positions, token_losses, topk_logprobs

VOCAB = 151_936


class LargestTensor(TorchDispatchMode):
    """Records the byte size of the largest tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel() * leaf.element_size())
        return out


@pytest.fixture(scope="module")
def big_vocab() -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    return ids, mask


def test_token_losses_and_topk_hold_one_chunk_at_most(big_vocab: MixtralForCausalLM) -> None:
    chunk_bytes = 4 * VOCAB * 16  # 16 positions per chunk, 9.7 MB; the batch's full logits are 117 MB
    head = OutputHead(big_vocab, chunk_bytes=chunk_bytes)
    ids, mask = _batch()
    with torch.inference_mode():
        decoded = head.decode(ids, mask)
        with LargestTensor() as losses_pass:
            loss, count = token_losses(head, decoded)
        with LargestTensor() as topk_pass:
            topk_logprobs(head, decoded, k=5)
        with LargestTensor() as full_pass:  # what the model's own forward holds: the test can fail
            full = big_vocab(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert full_pass.largest >= 2 * 96 * VOCAB * 4
    assert losses_pass.largest <= chunk_bytes
    assert topk_pass.largest <= chunk_bytes
    keep = predicted_positions(mask)
    expected = torch.nn.functional.cross_entropy(full[keep], ids[:, 1:][keep[:, :-1]], reduction="sum")
    assert int(count) == 95 + 85
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_generation_computes_the_head_on_the_last_position_only(tiny_inspector) -> None:
    insp = tiny_inspector("mixtral")
    positions: list[int] = []
    head = insp.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: positions.append(out.shape[1]))
    try:
        frame = insp.route("def add(a, b): return a + b", generate=4)
    finally:
        handle.remove()
    # prefill + 3 decode steps, one position each; the extra step that routes the 4th new token runs no head
    assert positions == [1, 1, 1, 1]
    assert (frame["phase"] == "decode").sum() == 4 * len(insp.loaded.routers) * 2  # top-2 rows per router
