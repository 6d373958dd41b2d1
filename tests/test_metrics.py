"""Tests for moe_inspect.metrics: hand-worked examples, uniform sanity values, and reference implementations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from moe_inspect import metrics as M

# ----------------------------------------------------------------------------------------------------------
# load and balance, hand-worked
# ----------------------------------------------------------------------------------------------------------

# n = [6, 2, 0, 0], E = 4 (a pure count vector; the formulas do not need T or k).
#   share = [6/8, 2/8, 0, 0] = [.75, .25, 0, 0]
#   H = -(.75 ln .75 + .25 ln .25) = .75*0.2876821 + .25*1.3862944 = 0.5623351 nats
#   normalised H / ln 4 = 0.5623351 / 1.3862944 = 0.4056391   (= binary entropy H2(.25) = 0.8112781 bits / 2)
#   effective experts exp(H) = (4/3)^.75 * 4^.25 = 1.2408064 * 1.4142136 = 1.7547654
#   mean 2, deviations (4, 0, -2, -2), population variance (16+0+4+4)/4 = 6, cv = sqrt(6)/2 = 1.2247449
#   max/mean = 6/2 = 3, MaxVio = 2
#   Jain = 8^2 / (4 * (36 + 4)) = 64/160 = 0.4
#   dead = 2
#   balancedness over 2 ranks (experts {0,1}, {2,3}): loads (8, 0), mean 4 / max 8 = 0.5; per expert 2/6 = 1/3
N_SKEW = [6, 2, 0, 0]


def test_hand_worked_skewed_counts() -> None:
    torch.testing.assert_close(
        M.assignment_share(torch.tensor(N_SKEW)), torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64)
    )
    assert M.load_entropy([0.75, 0.25, 0.0, 0.0]) == pytest.approx(0.4056391, abs=1e-7)
    assert M.effective_experts([0.75, 0.25, 0.0, 0.0]) == pytest.approx(1.7547654, abs=1e-7)
    assert M.coefficient_of_variation(torch.tensor(N_SKEW)) == pytest.approx(1.2247449, abs=1e-7)
    assert M.max_over_mean(N_SKEW) == 3.0
    assert M.max_violation(N_SKEW) == 2.0
    assert M.jain_index(torch.tensor(N_SKEW)) == pytest.approx(0.4, abs=1e-12)
    assert M.dead_experts(torch.tensor(N_SKEW)) == 2
    assert M.balancedness(N_SKEW, num_ranks=2) == 0.5
    assert M.balancedness(N_SKEW) == pytest.approx(1 / 3)
    # load_entropy renormalises, so raw counts and shares agree
    assert M.load_entropy(torch.tensor(N_SKEW)) == pytest.approx(0.4056391, abs=1e-7)
    # numpy input works too
    assert M.jain_index(np.array(N_SKEW)) == pytest.approx(0.4)


def test_token_level_shares_hand_worked() -> None:
    # A consistent routing: T = 4 tokens, k = 2, E = 4, n = [4, 3, 1, 0] (sum 8 = T*k, each n <= T).
    #   token share n/T = [1, .75, .25, 0] (sums to k = 2); utilisation n / (T*k/E) = n / 2 = [2, 1.5, .5, 0]
    n = torch.tensor([4, 3, 1, 0])
    torch.testing.assert_close(M.token_share(n, 4), torch.tensor([1.0, 0.75, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        M.token_share(n, torch.tensor(4)), torch.tensor([1.0, 0.75, 0.25, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(M.utilization_ratio(n, 4, 2), torch.tensor([2.0, 1.5, 0.5, 0.0], dtype=torch.float64))
    # TV between [.75,.25,0,0] and uniform: 0.5 * (.5 + 0 + .25 + .25) = 0.5
    assert M.total_variation([0.75, 0.25, 0, 0], [0.25] * 4) == pytest.approx(0.5)
    assert M.total_variation(torch.tensor(N_SKEW), torch.tensor([3, 1, 0, 0])) == 0.0


def test_uniform_sanity_values() -> None:
    n = torch.full((8,), 5)
    share = M.assignment_share(n)
    assert M.load_entropy(share) == pytest.approx(1.0)
    assert M.effective_experts(share) == pytest.approx(8.0)
    assert M.coefficient_of_variation(n) == 0.0
    assert M.max_over_mean(n) == 1.0
    assert M.jain_index(n) == pytest.approx(1.0)
    assert M.dead_experts(n) == 0
    assert M.balancedness(n, num_ranks=4) == 1.0


def test_one_expert_takes_all() -> None:
    # n = [8, 0, 0, 0]: H = 0, exp(H) = 1, Jain = 64 / (4*64) = 1/E = 0.25,
    # cv: mean 2, deviations (6, -2, -2, -2), var 48/4 = 12, sqrt(12)/2 = sqrt(3) = sqrt(E-1)
    n = [8, 0, 0, 0]
    assert M.load_entropy(n) == 0.0
    assert M.effective_experts(n) == 1.0
    assert M.jain_index(n) == 0.25
    assert M.coefficient_of_variation(n) == pytest.approx(math.sqrt(3))
    assert M.max_over_mean(n) == 4.0
    assert M.dead_experts(n) == 3
    assert M.dead_experts([1, 0, 3, 0]) == 2  # an expert used once is alive


def test_degenerate_conventions() -> None:
    assert M.load_entropy([1.0]) == 1.0  # E == 1: trivially balanced
    assert M.effective_experts([3]) == 1.0
    for f in (M.load_entropy, M.effective_experts, M.coefficient_of_variation, M.max_over_mean, M.jain_index):
        assert math.isnan(f([0, 0, 0]))
    assert torch.isnan(M.assignment_share(torch.zeros(3))).all()
    with pytest.raises(ValueError):
        M.load_entropy([0.5, -0.1, 0.6])
    with pytest.raises(ValueError):
        M.balancedness([1, 2, 3], num_ranks=2)


def test_cv_uses_population_std() -> None:
    n = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert M.coefficient_of_variation(n) == pytest.approx(float(np.std(n.numpy()) / np.mean(n.numpy())))
    assert M.coefficient_of_variation(n) != pytest.approx(float(n.std() / n.mean()))  # not ddof=1


# ----------------------------------------------------------------------------------------------------------
# router confidence
# ----------------------------------------------------------------------------------------------------------


def test_router_entropy_hand_worked() -> None:
    # one-hot -> 0; uniform over 4 -> 1; two halves -> ln 2 / ln 4 = 0.5 (zeros contribute 0, not NaN)
    probs = torch.tensor([[1.0, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0]])
    torch.testing.assert_close(M.router_entropy(probs), torch.tensor([0.0, 1.0, 0.5]))
    assert M.router_entropy(probs.double()).dtype == torch.float32
    assert M.router_entropy(torch.ones(3, 1)).tolist() == [0.0, 0.0, 0.0]  # C == 1: no uncertainty


def test_router_entropy_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, 16, generator=g) * 3, -1)
    ref = -(p.double() * p.double().log()).sum(-1) / math.log(16)
    torch.testing.assert_close(M.router_entropy(p).double(), ref, atol=1e-6, rtol=1e-6)


def test_routing_distribution_hand_worked() -> None:
    ln3 = math.log(3)
    # softmax([0, ln 3]) = [1, 3]/4
    torch.testing.assert_close(
        M.routing_distribution(torch.tensor([[0.0, ln3]]), "softmax"), torch.tensor([[0.25, 0.75]])
    )
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4; normalised: [.5, .75] / 1.25 = [.4, .6]
    torch.testing.assert_close(
        M.routing_distribution(torch.tensor([[0.0, ln3]]), "sigmoid"), torch.tensor([[0.4, 0.6]])
    )
    # softplus(ln(e-1)) = ln e = 1, softplus(ln(e^4-1)) = 4: sqrt -> [1, 2], normalised [1/3, 2/3]
    x = torch.tensor([[math.log(math.e - 1), math.log(math.e**4 - 1)]])
    torch.testing.assert_close(M.routing_distribution(x, "sqrtsoftplus"), torch.tensor([[1 / 3, 2 / 3]]))
    p = torch.tensor([[0.1, 0.9]], dtype=torch.bfloat16)
    out = M.routing_distribution(p, "probabilities")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, p.float())
    for scoring in ("softmax", "sigmoid", "sqrtsoftplus"):
        out = M.routing_distribution(torch.randn(7, 5, dtype=torch.bfloat16), scoring)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.sum(-1), torch.ones(7))
    with pytest.raises(ValueError):
        M.routing_distribution(x, "relu")  # type: ignore[arg-type]


def test_top1_margin() -> None:
    top, margin = M.top1_margin(torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.4, 0.0]]))
    torch.testing.assert_close(top, torch.tensor([0.5, 0.6]))
    torch.testing.assert_close(margin, torch.tensor([0.2, 0.2]))


# ----------------------------------------------------------------------------------------------------------
# HF aux loss
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func


def test_hf_aux_loss_hand_worked(hf_loss) -> None:
    # T=2, E=2, k=1. token 0: softmax([ln 3, 0]) = [.75, .25] -> picks 0; token 1: softmax([ln 9, 0]) = [.9, .1]
    # -> picks 0. f = counts/T = [1, 0]; P = [(.75+.9)/2, (.25+.1)/2] = [.825, .175]; loss = 2 * (1*.825) = 1.65
    logits = torch.tensor([[math.log(3), 0.0], [math.log(9), 0.0]])
    assert M.hf_aux_loss(logits, 1) == pytest.approx(1.65, rel=1e-6)
    assert float(hf_loss((logits,), 2, 1)) == pytest.approx(1.65, rel=1e-6)
    # the same two tokens plus a padded third row (B=1, S=3, mask [1,1,0]) that would pick expert 1: still 1.65
    padded = torch.cat([logits, torch.tensor([[0.0, math.log(1000)]])])
    mask = torch.tensor([[1, 1, 0]])
    assert M.hf_aux_loss(padded, 1, mask) == pytest.approx(1.65, rel=1e-6)
    assert float(hf_loss((padded,), 2, 1, mask)) == pytest.approx(1.65, rel=1e-6)
    # k == E: every expert always selected, f = [1, 1], sum P = 1 -> loss = E = 2 whatever the logits
    assert M.hf_aux_loss(logits, 2) == pytest.approx(2.0, rel=1e-6)


def test_hf_aux_loss_uniform_gives_k(hf_loss) -> None:
    # From sums: counts T*k/E each, prob sums T/E each -> E * E * (k/E) * (1/E) = k
    for e, k in [(8, 2), (64, 8), (4, 1)]:
        t = 16 * e
        assert M.aux_loss_from_sums(torch.full((e,), t * k / e), torch.full((e,), t / e), t, e) == pytest.approx(k)
    # From logits: E=4, k=2, row t = eps * roll([3,2,1,0], t). Each expert is in the top 2 of exactly 2 rows and
    # takes every probability value once over the 4 rows, so f = [.5]*4, P = [.25]*4: loss = 4 * 4 * .5*.25 = 2
    base = torch.tensor([3.0, 2.0, 1.0, 0.0]) * 1e-3
    logits = torch.stack([torch.roll(base, t) for t in range(4)])
    assert M.hf_aux_loss(logits, 2) == pytest.approx(2.0, rel=1e-6)
    assert float(hf_loss((logits,), 4, 2)) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize(("e", "k"), [(4, 1), (8, 2), (16, 4), (60, 4), (128, 8)])
def test_hf_aux_loss_equals_transformers(hf_loss, e: int, k: int) -> None:
    g = torch.Generator().manual_seed(e * 100 + k)
    b, s = 5, 9
    logits = torch.randn(b * s, e, generator=g) * 2
    assert M.hf_aux_loss(logits, k) == pytest.approx(float(hf_loss((logits,), e, k)), rel=1e-6)
    # padding: rows 0-1 left-padded, rows 3-4 right-padded, row 2 full
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :8] = 0
    mask[3, 4:] = 0
    mask[4, 1:] = 0
    ours = M.hf_aux_loss(logits, k, mask)
    assert ours == pytest.approx(float(hf_loss((logits,), e, k, mask)), rel=1e-6)
    # and equal to the unmasked loss on the real rows only
    assert ours == pytest.approx(M.hf_aux_loss(logits[mask.reshape(-1).bool()], k), rel=1e-6)
    # bf16 logits: transformers does softmax/top-k in bf16; so do we
    lb = logits.bfloat16()
    assert M.hf_aux_loss(lb, k, mask) == pytest.approx(float(hf_loss((lb,), e, k, mask)), rel=1e-5)


def test_hf_aux_loss_streamed_over_three_chunks(hf_loss) -> None:
    g = torch.Generator().manual_seed(7)
    e, k, b, s = 8, 2, 6, 11
    logits = torch.randn(b * s, e, generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.3).long()
    full = float(hf_loss((logits,), e, k, mask))
    counts, probs, tokens = torch.zeros(e), torch.zeros(e), torch.zeros(())
    for rows in torch.arange(b).chunk(3):  # chunks of whole sequences; logits rows are batch-major
        sel = (rows[:, None] * s + torch.arange(s)).reshape(-1)
        c, p, t = M.aux_loss_sums(logits[sel], k, mask[rows])
        counts, probs, tokens = counts + c, probs + p, tokens + t
    assert M.aux_loss_from_sums(counts, probs, tokens, e) == pytest.approx(full, rel=1e-6)
    assert int(tokens) == int(mask.sum())


def test_aux_loss_from_sums_accepts_rank_layout(hf_loss) -> None:
    # transformers <= 4.x: one_hot(selected) [T, k, E] averaged over tokens -> [k, E], times P[None], summed, * E
    g = torch.Generator().manual_seed(3)
    e, k, t = 8, 2, 40
    logits = torch.randn(t, e, generator=g)
    probs = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(torch.topk(probs, k, -1).indices, e).float()  # [T, k, E]
    legacy = float(e * (onehot.mean(0) * probs.mean(0)[None]).sum())
    kxe = M.aux_loss_from_sums(onehot.sum(0), probs.sum(0), t, e)  # [k, E]
    flat = M.aux_loss_from_sums(onehot.sum((0, 1)), probs.sum(0), t, e)  # [E]
    assert kxe == pytest.approx(legacy, rel=1e-6)
    assert flat == pytest.approx(legacy, rel=1e-6)
    assert flat == pytest.approx(float(hf_loss((logits,), e, k)), rel=1e-6)
    with pytest.raises(ValueError):
        M.aux_loss_from_sums(torch.zeros(k, e + 1), probs.sum(0), t, e)


def test_hf_multi_layer_is_concatenation_not_mean(hf_loss) -> None:
    g = torch.Generator().manual_seed(11)
    e, k, t = 8, 2, 30
    layers = tuple(torch.randn(t, e, generator=g) * (i + 1) for i in range(3))
    sums = [M.aux_loss_sums(x, k) for x in layers]
    counts = sum(c for c, _, _ in sums)
    probs = sum(p for _, p, _ in sums)
    ours = M.aux_loss_from_sums(counts, probs, 3 * t, e)
    assert ours == pytest.approx(float(hf_loss(layers, e, k)), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# other losses
# ----------------------------------------------------------------------------------------------------------


def test_switch_loss() -> None:
    # first choices [2, 0] of T=2 tokens, prob sums [1.65, .35]: 2 * (1 * .825 + 0 * .175) = 1.65
    assert M.switch_loss(torch.tensor([2, 0]), torch.tensor([1.65, 0.35]), 2) == pytest.approx(1.65)
    # uniform: f = P = 1/E -> E * E * (1/E^2) = 1
    assert M.switch_loss([1, 1, 1, 1], [1.0, 1.0, 1.0, 1.0], 4) == pytest.approx(1.0)
    # reference: from logits directly
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 8, generator=g)
    p = torch.softmax(logits, -1)
    f = torch.nn.functional.one_hot(p.argmax(-1), 8).float().mean(0)
    ref = float(8 * (f * p.mean(0)).sum())
    fc = M.first_choice_counts(torch.topk(p, 2, -1).indices, 8)
    assert M.switch_loss(fc, p.sum(0), 64) == pytest.approx(ref, rel=1e-6)


def test_z_loss() -> None:
    # lse([0, 0]) = ln 2 -> 0.480453; lse([0, ln 3]) = ln 4 -> 1.921812; stable for large logits
    out = M.z_loss(torch.tensor([[0.0, 0.0], [0.0, math.log(3)], [1000.0, 1000.0]]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, torch.tensor([math.log(2) ** 2, math.log(4) ** 2, (1000 + math.log(2)) ** 2]), rtol=1e-6, atol=1e-6
    )


def test_deepseek_balance_loss() -> None:
    # n = [4,3,1,0], T=4, k=2, E=4: f = 4/(2*4) * n = [2, 1.5, .5, 0]; prob sums [2, 1, .6, .4] -> P = [.5, .25,
    # .15, .1]; sum f P = 1 + .375 + .075 + 0 = 1.45
    assert M.deepseek_balance_loss([4, 3, 1, 0], [2.0, 1.0, 0.6, 0.4], 4, 2) == pytest.approx(1.45)
    assert M.deepseek_balance_loss([4, 3, 1, 0], [2.0, 1.0, 0.6, 0.4], 4, 2, alpha=0.1) == pytest.approx(0.145)
    # uniform: f = 1, P = 1/E -> alpha
    assert M.deepseek_balance_loss([2, 2, 2, 2], [1.0] * 4, 4, 2, alpha=0.3) == pytest.approx(0.3)


# ----------------------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------------------


def test_expert_and_first_choice_counts() -> None:
    experts = torch.tensor([[0, 1], [0, 2], [4, -1]])  # 4 (a null expert) and -1 (padding) are ignored
    assert M.expert_counts(experts, 3).tolist() == [2, 1, 1]
    assert M.expert_counts(experts, 5).tolist() == [2, 1, 1, 0, 1]
    assert M.first_choice_counts(experts, 3).tolist() == [2, 0, 0]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 10, (200, 4), generator=g)
    assert torch.equal(M.expert_counts(ids, 12), torch.bincount(ids.reshape(-1), minlength=12))
    assert torch.equal(M.first_choice_counts(ids, 12), torch.bincount(ids[:, 0], minlength=12))


# ----------------------------------------------------------------------------------------------------------
# capacity and dropping
# ----------------------------------------------------------------------------------------------------------


def test_expert_capacity() -> None:
    assert M.expert_capacity(8, 2, 4, 1.0) == 4
    assert M.expert_capacity(8, 2, 4, 1.25) == 5
    assert M.expert_capacity(3, 1, 2, 0.5) == 1  # ceil(0.75)
    assert M.expert_capacity(45, 2, 3, 1.1) == 33  # exact; float 1.1*45*2/3 = 33.00000000000001 -> 34
    assert M.expert_capacity(0, 2, 4, 1.0) == 0
    with pytest.raises(ValueError):
        M.expert_capacity(8, 2, 4, -1.0)


# T=5, k=2, E=3, capacity 2 (= ceil(0.6 * 5 * 2 / 3)). Position policy, in (token, rank) order:
#   t0 [0, 1]: e0 #1 keep, e1 #1 keep
#   t1 [0, 2]: e0 #2 keep, e2 #1 keep
#   t2 [1, 0]: e1 #2 keep, e0 #3 DROP
#   t3 [2, 1]: e2 #2 keep, e1 #3 DROP
#   t4 [0, 2]: e0 #4 DROP, e2 #3 DROP      -> 4 dropped = (4-2) + (3-2) + (3-2)
HAND_EXPERTS = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1], [0, 2]])


def test_dropping_hand_worked() -> None:
    assert int(M.dropped_assignments(HAND_EXPERTS, 3, 0.6)) == 4
    assert int(M.dropped_assignments(HAND_EXPERTS, 3, 1.0, capacity=2)) == 4
    assert int(M.dropped_assignments(HAND_EXPERTS, 3, 1.0)) == 0  # C = ceil(10/3) = 4 >= every load (4, 3, 3)
    assert int(M.dropped_assignments(HAND_EXPERTS, 3, 1.0, capacity=3)) == 1  # only e0's 4th (t4) drops
    keep = M.capacity_keep_mask(HAND_EXPERTS, 3, 0.6)
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, False], [False, False]]
    # probs policy, weights per (t, r); per expert the 2 highest weights win:
    #   e0: t0 .6, t1 .7, t2 .4, t4 .9 -> keep t4, t1      e1: t0 .4, t2 .6, t3 .45 -> keep t2, t3
    #   e2: t1 .3, t3 .55, t4 .1 -> keep t3, t1
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45], [0.9, 0.1]])
    keep_p = M.capacity_keep_mask(HAND_EXPERTS, 3, 0.6, policy="probs", weights=w)
    assert keep_p.tolist() == [[False, False], [True, True], [True, False], [True, True], [True, False]]
    with pytest.raises(ValueError):
        M.capacity_keep_mask(HAND_EXPERTS, 3, 0.6, policy="probs")


def _brute_force_keep(experts: list[list[int]], num_experts: int, cap: int) -> list[list[bool]]:
    seen = [0] * num_experts
    keep = []
    for row in experts:  # tokens in batch order, ranks in order
        out = []
        for e in row:
            if 0 <= e < num_experts:
                out.append(seen[e] < cap)
                seen[e] += 1
            else:
                out.append(True)  # null expert / padding id: no capacity
        keep.append(out)
    return keep


def test_dropping_vs_brute_force() -> None:
    g = torch.Generator().manual_seed(42)
    for trial in range(30):
        e = int(torch.randint(2, 12, (1,), generator=g))
        k = int(torch.randint(1, min(e, 4) + 1, (1,), generator=g))
        t = int(torch.randint(1, 60, (1,), generator=g))
        # distinct experts per token, skewed towards low ids; some trials include a null id e (>= E)
        scores = torch.rand(t, e + 1, generator=g) + torch.linspace(1.0, 0.0, e + 1) * (trial % 3)
        if trial % 2:
            scores[:, e] = -1.0  # no null experts in odd trials
        experts = torch.topk(scores, k, -1).indices
        cf = [0.5, 1.0, 1.25, 2.0][trial % 4]
        cap = M.expert_capacity(t, k, e, cf)
        ref = _brute_force_keep(experts.tolist(), e, cap)
        assert M.capacity_keep_mask(experts, e, cf).tolist() == ref
        n_ref = sum(not x for row in ref for x in row)
        assert int(M.dropped_assignments(experts, e, cf)) == n_ref


# ----------------------------------------------------------------------------------------------------------
# locality
# ----------------------------------------------------------------------------------------------------------


def test_repeat_counts_hand_worked() -> None:
    # pairs: ([0,1],[0,2]) same first + overlap; ([0,2],[1,3]) neither; ([1,3],[3,1]) overlap only;
    # ([3,1],[2,0]) neither  ->  first_same 1, any_overlap 2, pairs 4
    seq = torch.tensor([[0, 1], [0, 2], [1, 3], [3, 1], [2, 0]])
    assert [int(x) for x in M.repeat_counts(seq)] == [1, 2, 4]
    assert [int(x) for x in M.repeat_counts(seq[:1])] == [0, 0, 0]
    assert [int(x) for x in M.repeat_counts(torch.tensor([3, 3, 1]))] == [1, 1, 2]  # [S] = rank-0 only


def test_repeat_counts_batched_hand_worked() -> None:
    # row 0 right-padded: real [0,1],[0,2],[1,3]; the pad slot copies [1,3] so counting it would add a repeat.
    #   pairs ([0,1],[0,2]) first+overlap, ([0,2],[1,3]) neither -> (1, 1, 2)
    # row 1 left-padded: pad copies [3,1]; real [3,1],[3,0],[2,0]
    #   pairs ([3,1],[3,0]) first+overlap, ([3,0],[2,0]) overlap -> (1, 2, 2)
    experts = torch.tensor([[[0, 1], [0, 2], [1, 3], [1, 3]], [[3, 1], [3, 1], [3, 0], [2, 0]]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert [int(x) for x in M.repeat_counts_batched(experts, mask)] == [2, 3, 4]


def test_repeat_counts_batched_equals_per_row() -> None:
    g = torch.Generator().manual_seed(9)
    b, s, e, k = 6, 12, 6, 2
    experts = torch.topk(torch.rand(b, s, e, generator=g), k, -1).indices
    lengths = torch.randint(0, s + 1, (b,), generator=g)
    mask = torch.zeros(b, s, dtype=torch.bool)
    expected = torch.zeros(3, dtype=torch.long)
    for i in range(b):
        n = int(lengths[i])
        if i % 2:
            mask[i, s - n :] = True  # left padding
        else:
            mask[i, :n] = True  # right padding
        expected += torch.stack(M.repeat_counts(experts[i][mask[i]]))
    assert torch.stack(M.repeat_counts_batched(experts, mask)).tolist() == expected.tolist()


def test_random_repeat_baselines_closed_form() -> None:
    first, anyo = M.random_repeat_baselines(8, 2)
    assert first == 0.125
    assert anyo == pytest.approx(13 / 28)  # 1 - C(6,2)/C(8,2) = 1 - 15/28
    assert round(anyo, 4) == 0.4643
    assert M.random_repeat_baselines(4, 3)[1] == 1.0  # two 3-subsets of 4 always intersect
    # enumeration over all pairs of k-subsets
    for e, k in [(8, 2), (6, 3), (10, 3), (5, 1)]:
        subsets = [set(c) for c in itertools.combinations(range(e), k)]
        hits = sum(bool(a & b) for a in subsets for b in subsets)
        assert M.random_repeat_baselines(e, k)[1] == pytest.approx(hits / len(subsets) ** 2)
    with pytest.raises(ValueError):
        M.random_repeat_baselines(4, 5)


def test_random_repeat_baselines_monte_carlo() -> None:
    # independent uniform routing of 20000 tokens: rates within ~4 standard errors of the closed forms
    g = torch.Generator().manual_seed(123)
    s, e, k = 20000, 8, 2
    experts = torch.rand(s, e, generator=g).argsort(-1)[:, :k]
    first_same, overlap, pairs = M.repeat_counts(experts)
    first, anyo = M.random_repeat_baselines(e, k)
    assert int(first_same) / int(pairs) == pytest.approx(first, abs=0.01)
    assert int(overlap) / int(pairs) == pytest.approx(anyo, abs=0.015)


# ----------------------------------------------------------------------------------------------------------
# co-activation, transitions, specialisation
# ----------------------------------------------------------------------------------------------------------


def test_coactivation_hand_worked() -> None:
    # tokens {0,1}, {0,2}, {1,0}: N[0,1] = N[1,0] = 2, N[0,2] = N[2,0] = 1
    experts = torch.tensor([[0, 1], [0, 2], [1, 0]])
    coact = M.coactivation_counts(experts, 3)
    assert coact.tolist() == [[0, 2, 1], [2, 0, 0], [1, 0, 0]]
    # share N[i,j]/N[i] with n = [3, 2, 1]: row 0 [0, 2/3, 1/3] (sums to k-1 = 1), rows 1, 2: [1, 0, 0]
    share = M.coactivation_share(coact, M.expert_counts(experts, 3))
    torch.testing.assert_close(share, torch.tensor([[0, 2 / 3, 1 / 3], [1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64))
    # null expert id 3 (>= E) is ignored: only the {1,2} pair counts; an unused expert's share row is 0
    coact2 = M.coactivation_counts(torch.tensor([[0, 3], [1, 2]]), 3)
    assert coact2.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert M.coactivation_share(coact2, torch.tensor([0, 1, 1])).tolist()[0] == [0.0, 0.0, 0.0]


def test_coactivation_vs_brute_force_and_matmul() -> None:
    g = torch.Generator().manual_seed(4)
    t, e, k = 120, 10, 3
    experts = torch.topk(torch.rand(t, e, generator=g), k, -1).indices
    brute = torch.zeros(e, e, dtype=torch.long)
    for row in experts.tolist():
        for i, j in itertools.permutations(row, 2):
            brute[i, j] += 1
    coact = M.coactivation_counts(experts, e)
    assert torch.equal(coact, brute)
    assert torch.equal(coact, coact.T)
    onehot = torch.nn.functional.one_hot(experts, e).sum(1).double()  # [T, E]
    assert torch.equal(coact, (onehot.T @ onehot).fill_diagonal_(0).long())


def test_transition_counts() -> None:
    # rank-0 at layer a [0, 1, 1], at layer b [2, 2, 0]: pairs (0,2), (1,2), (1,0)
    out = M.transition_counts(torch.tensor([0, 1, 1]), torch.tensor([2, 2, 0]), 2, 3)
    assert out.tolist() == [[0, 0, 1], [1, 0, 1]]
    g = torch.Generator().manual_seed(2)
    a = torch.topk(torch.rand(50, 6, generator=g), 2, -1).indices
    b = torch.topk(torch.rand(50, 4, generator=g), 3, -1).indices
    brute = torch.zeros(6, 4, dtype=torch.long)
    for ra, rb in zip(a.tolist(), b.tolist(), strict=True):
        for i in ra:
            for j in rb:
                brute[i, j] += 1
    assert torch.equal(M.transition_counts(a, b, 6, 4), brute)


def test_vocab_specialization() -> None:
    # rows: 3 of 4 to the top expert -> .75; never seen -> NaN; 2 of 4 -> .5
    out = M.vocab_specialization(torch.tensor([[3, 1, 0], [0, 0, 0], [2, 2, 0]]))
    assert out[0] == 0.75 and math.isnan(out[1]) and out[2] == 0.5


# ----------------------------------------------------------------------------------------------------------
# device: per-batch functions must not synchronise with the host
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_per_batch_functions_do_not_sync() -> None:
    dev = torch.device("cuda")
    logits = torch.randn(64, 16, device=dev)
    experts = torch.topk(logits, 4, -1).indices
    mask = torch.ones(8, 8, dtype=torch.long, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scoring in ("softmax", "sigmoid", "sqrtsoftplus", "probabilities"):
            M.router_entropy(M.routing_distribution(logits, scoring))  # type: ignore[arg-type]
        M.top1_margin(torch.softmax(logits, -1))
        M.z_loss(logits)
        M.aux_loss_sums(logits, 4, mask)
        M.expert_counts(experts, 16)
        M.first_choice_counts(experts, 16)
        M.dropped_assignments(experts, 16, 1.0)
        M.capacity_keep_mask(experts, 16, 1.0)
        M.capacity_keep_mask(experts, 16, 1.0, policy="probs", weights=torch.rand(64, 4, device=dev))
        M.repeat_counts(experts)
        M.repeat_counts_batched(experts.reshape(8, 8, 4), mask)
        M.coactivation_counts(experts, 16)
        M.transition_counts(experts, experts, 16, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
