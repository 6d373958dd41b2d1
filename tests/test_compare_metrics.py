"""The comparison metrics in ``metrics`` against hand-worked examples (and scipy where it has the same quantity)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_inspect import metrics


def test_js_divergence_hand_worked() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.2, 0.8]])
    js = metrics.js_divergence(p, q)
    # [0.5, 0.5] vs [1, 0]: m = [0.75, 0.25]; KL(p||m) = 0.5 log2(2/3) + 0.5 log2 2, KL(q||m) = log2(4/3)
    second = 0.5 * ((0.5 * math.log2(2 / 3) + 0.5) + math.log2(4 / 3))
    assert js[0].item() == pytest.approx(1.0)  # disjoint supports: 1 bit
    assert js[1].item() == pytest.approx(second, rel=1e-6)
    assert js[2].item() == 0.0  # identical rows: exactly 0


def test_js_divergence_renormalises_half_precision_rows() -> None:
    p = torch.tensor([[0.3, 0.3, 0.4]]).half()
    assert metrics.js_divergence(p, p).item() == 0.0
    assert metrics.js_divergence(p * 2, p).item() == pytest.approx(0.0, abs=1e-7)


def test_load_js_matches_scipy() -> None:
    distance = pytest.importorskip("scipy.spatial.distance")
    a, b = np.array([10, 30, 0, 60]), np.array([25, 25, 25, 25])
    assert metrics.load_js(a, b) == pytest.approx(distance.jensenshannon(a, b, base=2) ** 2, rel=1e-9)


def test_set_intersection_and_weight_overlap() -> None:
    a = torch.tensor([[0, 1], [0, 1], [3, 2]])
    b = torch.tensor([[1, 2], [1, 0], [4, 5]])
    assert metrics.set_intersection(a, b).tolist() == [1, 2, 0]
    wa = torch.tensor([[0.6, 0.2], [0.5, 0.5], [0.9, 0.1]])
    wb = torch.tensor([[0.5, 0.5], [0.3, 0.7], [0.5, 0.5]])
    # row 0: A normalised (0.75, 0.25), shared expert 1: min(0.25, 0.5); row 1: min(.5,.7) + min(.5,.3); row 2: none
    torch.testing.assert_close(metrics.weight_overlap(a, wa, b, wb), torch.tensor([0.25, 0.8, 0.0]))


def test_kth_margin() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    torch.testing.assert_close(metrics.kth_margin(probs, 2), torch.tensor([0.15, 0.15]))
    torch.testing.assert_close(metrics.kth_margin(probs, 1), torch.tensor([0.2, 0.2]))
    torch.testing.assert_close(metrics.kth_margin(probs, 4), torch.tensor([0.05, 0.05]))  # C == k: the k-th itself


def test_log2_ratio_and_specialisation() -> None:
    ratio = metrics.log2_ratio([0.25, 0.5, 0.0, 0.0, 0.25], [0.5, 0.5, 0.1, 0.0, 0.0])
    assert ratio[:2].tolist() == [1.0, 0.0]
    assert ratio[2] == math.inf and math.isnan(ratio[3]) and ratio[4] == -math.inf
    np.testing.assert_allclose(metrics.specialisation([0.5, 0.25, 0.125], 8, 2), [2.0, 1.0, 0.5])


def test_topk_kl_hand_worked_and_full_support() -> None:
    la = torch.tensor([[math.log(0.5), math.log(0.25)]])
    lb = torch.tensor([[math.log(0.25), math.log(0.25)]])
    kl = metrics.topk_kl(la, torch.tensor([math.log(0.25)]), lb, torch.tensor([math.log(0.5)]))
    # 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.25) + rest 0.25 ln(0.25/0.5)
    assert kl.item() == pytest.approx(0.25 * math.log(2), rel=1e-7)  # float32 inputs
    # with the whole vocabulary as the "top-k" the rest is empty and this is the ordinary KL
    generator = torch.Generator().manual_seed(0)
    pa = torch.log_softmax(torch.randn(3, 6, generator=generator, dtype=torch.float64), -1)
    pb = torch.log_softmax(torch.randn(3, 6, generator=generator, dtype=torch.float64), -1)
    full = torch.nn.functional.kl_div(pb, pa, log_target=True, reduction="none").sum(-1)
    empty = torch.full((3,), -math.inf, dtype=torch.float64)
    torch.testing.assert_close(metrics.topk_kl(pa, empty, pb, empty), full)
    # merging tokens into the rest bucket can only lower it
    rest_a, rest_b = pa[:, 2:].logsumexp(-1), pb[:, 2:].logsumexp(-1)
    assert (metrics.topk_kl(pa[:, :2], rest_a, pb[:, :2], rest_b) <= full + 1e-12).all()
