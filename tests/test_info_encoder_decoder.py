"""``info`` on encoder-decoder MoE configs (issue 17): figures checked against hand arithmetic on tiny configs."""

from __future__ import annotations

from tiny_seq2seq_vl import seq2seq_config

from moe_inspect.analysis.info import describe

VOCAB_EMBED = 384 * 64  # tiny tokenizer's vocabulary x d_model, shared by both stacks and tied to the LM head
ATTN = 4 * 64 * 64  # q, k, v, o


def test_switch_figures_by_hand() -> None:
    info = describe(seq2seq_config("switch_transformers"))
    experts = 8 * (64 * 64 * 2)  # wi + wo per expert, no biases
    router = 64 * 8
    rel_bias = 32 * 4  # relative-attention buckets x heads, block 0 of each stack
    encoder = 2 * ATTN + rel_bias + 2 * 2 * 64 + 64 * 64 * 2 + router + experts + 64  # + LNs, dense FF, final LN
    decoder = 4 * ATTN + rel_bias + 2 * 3 * 64 + 64 * 64 * 2 + router + experts + 64  # self + cross attention
    assert info.total_params == VOCAB_EMBED + encoder + decoder == 272_384
    assert info.routed_expert_params == 2 * experts
    assert info.active_params == info.total_params - 2 * experts * 7 // 8  # top-1 of 8 in each stack
    assert info.tied_embeddings
    encoder_info, decoder_info = info.stacks
    assert (encoder_info.stack, encoder_info.num_layers, encoder_info.moe_layers, encoder_info.dense_layers) == (
        "encoder", 2, [1], [0],
    )
    assert (decoder_info.num_experts, decoder_info.top_k) == (8, 1)
    assert encoder_info.total_params == VOCAB_EMBED + encoder
    assert decoder_info.active_params == VOCAB_EMBED + decoder - experts * 7 // 8
    assert [(entry.stack, entry.layer, entry.kind) for entry in info.layers] == [
        ("encoder", 0, "dense"), ("encoder", 1, "moe"), ("decoder", 0, "dense"), ("decoder", 1, "moe"),
    ]
    assert "capacity are dropped inside the router" in info.routing_rule
    assert any("at most 3 tokens per expert per sequence" in note for note in info.notes)


def test_nllb_figures_by_hand() -> None:
    info = describe(seq2seq_config("nllb-moe"))
    experts = 8 * (64 * 64 * 2 + 64 + 64)  # fc1 + fc2 with biases
    assert info.routed_expert_params == 2 * experts
    assert info.active_params == info.total_params - 2 * experts * 6 // 8  # top-2 of 8
    assert [(s.moe_layers, s.top_k) for s in info.stacks] == [([1], 2), ([1], 2)]
    assert "weights renormalised to sum to 1" in info.routing_rule
    assert any("Second-expert policy 'all'" in note for note in info.notes)
