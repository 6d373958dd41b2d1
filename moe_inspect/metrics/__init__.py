"""Every routing-metric formula moe-inspect reports, as pure functions.

Definitions follow ``shared/reference/routing-metrics.md``. Notation: ``E`` routed experts in a layer, ``k``
experts per token, ``T`` real (non-pad) tokens, ``n[e]`` assignments of expert ``e`` (``sum(n) == T*k``).

Two kinds of function live here:

* **End-of-run** functions take per-layer accumulated counts/sums (``[E]`` tensors, numpy arrays or lists) and
  return Python floats/ints. They copy the ``[E]`` vector to the host once and work in float64, so they are
  exact enough for corpus-sized counts and run on any device (MPS has no float64).
* **Per-batch** functions (``routing_distribution``, ``router_entropy``, ``top1_margin``, ``z_loss``,
  ``aux_loss_sums``, ``expert_counts``, ``first_choice_counts``, ``dropped_assignments``,
  ``capacity_keep_mask``, ``repeat_counts``, ``repeat_counts_batched``, ``coactivation_counts``,
  ``transition_counts``) are vectorised torch, stay on the input's device and never synchronise with the host
  (no ``.item()``, ``bincount``, boolean indexing or host-to-device copies), so they can run inside the
  capture loop as long as every input (masks included) is already on the device. Their results are meant to
  be summed across batches.

Expert ids outside ``[0, E)`` (or ``[0, num_columns)``) are ignored by the counting functions: these are the
null/zero experts some families append after the routed ones, and ``-1`` padding.

The formulas live in one module per family (``load_balance``, ``router``, ``capacity``, ``locality``,
``comparison``); this package re-exports every public name, so ``from moe_inspect.metrics import X`` is the
way in. Nothing here imports from the rest of moe_inspect.
"""

from __future__ import annotations

from moe_inspect.metrics._common import SCORINGS as SCORINGS
from moe_inspect.metrics._common import ArrayLike as ArrayLike
from moe_inspect.metrics._common import Number as Number
from moe_inspect.metrics._common import Scoring as Scoring
from moe_inspect.metrics.capacity import (
    capacity_keep_mask,
    dropped_assignments,
    expert_capacity,
    expert_counts,
    first_choice_counts,
)
from moe_inspect.metrics.comparison import (
    js_divergence,
    kth_margin,
    load_js,
    log2_ratio,
    set_intersection,
    specialisation,
    topk_kl,
    weight_overlap,
)
from moe_inspect.metrics.load_balance import (
    assignment_share,
    balancedness,
    coefficient_of_variation,
    dead_experts,
    effective_experts,
    jain_index,
    load_entropy,
    max_over_mean,
    max_violation,
    token_share,
    total_variation,
    utilization_ratio,
)
from moe_inspect.metrics.locality import (
    coactivation_counts,
    coactivation_share,
    random_repeat_baselines,
    repeat_counts,
    repeat_counts_batched,
    transition_counts,
    vocab_specialization,
    vocab_specialization_random,
)
from moe_inspect.metrics.router import (
    aux_loss_from_sums,
    aux_loss_sums,
    deepseek_balance_loss,
    hf_aux_loss,
    router_entropy,
    routing_distribution,
    switch_loss,
    top1_margin,
    z_loss,
)

__all__ = [
    "assignment_share",
    "aux_loss_from_sums",
    "aux_loss_sums",
    "balancedness",
    "capacity_keep_mask",
    "coactivation_counts",
    "coactivation_share",
    "coefficient_of_variation",
    "dead_experts",
    "deepseek_balance_loss",
    "dropped_assignments",
    "effective_experts",
    "expert_capacity",
    "expert_counts",
    "first_choice_counts",
    "hf_aux_loss",
    "jain_index",
    "js_divergence",
    "kth_margin",
    "load_entropy",
    "load_js",
    "log2_ratio",
    "max_over_mean",
    "max_violation",
    "random_repeat_baselines",
    "repeat_counts",
    "repeat_counts_batched",
    "router_entropy",
    "routing_distribution",
    "set_intersection",
    "specialisation",
    "switch_loss",
    "token_share",
    "top1_margin",
    "topk_kl",
    "total_variation",
    "transition_counts",
    "utilization_ratio",
    "vocab_specialization",
    "vocab_specialization_random",
    "weight_overlap",
    "z_loss",
]
