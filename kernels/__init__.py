"""moezoo.kernels: Mixture-of-Experts compute as functions (no nn.Parameter lives here).

The pieces, in the order a MoE layer uses them:

- routing (:mod:`.routing`): logits -> ``RouterOutput(ids_TK, weights_TK, probs_TE, logits_TE)`` by softmax or
  sigmoid top-k (renormalisation, DeepSeek-V3 score bias, group-limited), top-p, expert-choice, noisy top-k,
  with an optional per-token allowed-expert mask;
- dispatch plan (:mod:`.plan`): slots sorted by expert, counts, int64 offsets, capacity dropping, Triton block
  padding;
- grouped expert compute (:mod:`.experts`): ``expert_mlp`` with ``backend="reference"|"torch"|"triton"|"auto"``
  and an optional always-on ``SharedExpert``, ``grouped_linear`` and ``combine`` for other expert kinds; the
  backends live in :mod:`.cpu_backend` (torch) and :mod:`.triton_moe`, the activations in :mod:`.activations`;
  ``pack_expert_weights`` packs experts' weights once for the torch backend's inference (``expert_mlp(packed=)``);
- auxiliary losses (:mod:`.losses`) and ternary expert weights (:mod:`.ternary`).

The decode kernel (:mod:`.cpu_decode`, imported by name): a whole MoE layer on a few tokens in one native call,
compiled on first use for the running CPU; the MoE blocks take it for no-grad calls of up to 128 tokens.

Expert parallelism (:mod:`.expert_parallel`, imported by name): the experts spread over the ranks of a
torch.distributed group, the plan's rows exchanged by ``all_to_all_single``, and the gradient reduction that
tells expert parameters from the rest.
"""

from .activations import ACTIVATIONS, activation_fn
from .cpu_backend import PackedExpertWeights, pack_expert_weights
from .experts import (
    BACKENDS,
    SharedExpert,
    combine,
    expert_mlp,
    grouped_linear,
    resolve_backend,
)
from .losses import (
    cv_squared,
    expert_balance_loss,
    expert_counts,
    importance_load_loss,
    router_z_loss,
    routing_entropy,
    switch_load_balance_loss,
)
from .plan import DispatchPlan, build_plan, capacity_for
from .routing import (RouterOutput, expert_choice_route, gshard_top2_route, noisy_topk_route, renormalize_kept,
                      top_p_route, topk_route)
from .ternary import pack_ternary, ternary_dequantize, ternary_quantize, ternary_ste, unpack_ternary

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "DispatchPlan",
    "PackedExpertWeights",
    "RouterOutput",
    "SharedExpert",
    "activation_fn",
    "build_plan",
    "capacity_for",
    "combine",
    "cv_squared",
    "expert_balance_loss",
    "expert_choice_route",
    "expert_counts",
    "expert_mlp",
    "grouped_linear",
    "importance_load_loss",
    "noisy_topk_route",
    "gshard_top2_route",
    "renormalize_kept",
    "pack_expert_weights",
    "pack_ternary",
    "resolve_backend",
    "router_z_loss",
    "routing_entropy",
    "switch_load_balance_loss",
    "ternary_dequantize",
    "ternary_quantize",
    "ternary_ste",
    "top_p_route",
    "topk_route",
    "unpack_ternary",
]
