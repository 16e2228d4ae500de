"""The MoE block every moezoo model uses: a router, routed experts and the optional extras of the papers.

Composition (all on ``moezoo.kernels``):

- routed experts: SwiGLU / GeGLU / plain MLP / ternary (MoTE), computed by ``kernels.expert_mlp`` with the
  chosen backend (``reference``, ``torch``, ``triton`` or ``auto``; change ``moe.backend`` at any time);
- routers: softmax or sigmoid top-k (optional renormalisation, DeepSeek-V3 score bias, group-limited top-k,
  routed scaling), top-p (a dynamic number of experts per token), expert-choice, noisy top-k;
- shared experts (DeepSeekMoE, DiT-MoE): a dense gated MLP every token goes through, optionally scaled by
  ``sigmoid(gate(x))`` as in Qwen2-MoE;
- null experts (UniMoE-Audio; MoE++'s *zero* experts are the same thing): routable, output zero, never
  computed, so a token can choose to spend less compute;
- copy and constant experts (MoE++): output ``x``, or ``a1 * x + a2 * v`` with ``[a1, a2] = softmax(W x)``;
- capacity with token dropping, multiplicative router jitter, and auxiliary losses by name and coefficient.

It is a :class:`~moezoo.zoo.layers.routed.RoutedBlock`: what it routed is in ``moe.routing`` after every
forward, read by ``collect_routing``, ``total_aux_loss`` and the routing pictures like every routed layer's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.kernels import cpu_decode, losses
from moezoo.kernels import expert_parallel as ep
from moezoo.kernels import SharedExpert, activation_fn, expert_mlp, pack_expert_weights, resolve_backend
from moezoo.kernels.cpu_backend import shared_apart_pays
from moezoo.kernels.plan import build_plan, capacity_for
from moezoo.kernels.routing import (
    RouterOutput,
    expert_choice_route,
    gshard_top2_route,
    noisy_topk_route,
    renormalize_kept,
    top_p_route,
    topk_route,
)
from moezoo.kernels.ternary import ternary_ste

from .blocks import GatedMLP
from .routed import RoutedBlock, routed_blocks

EXPERT_KINDS = {  # name -> (activation, gated)
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "mlp": ("gelu", False),
    "ternary": ("silu", True),  # MoTE: SwiGLU experts with ternary weights
}
ROUTERS = ("softmax", "sigmoid", "top_p", "expert_choice", "noisy", "gshard_top2")
EXPERT_PARAMETERS = ("w_in", "w_out", "b_in", "b_out")  # the routed experts' [E, ...] tensors: what EP shards


def init_like_linear_(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Experts' weights ``[E, out, in]`` (and biases ``[E, out]``) initialised as an nn.Linear of each expert's
    shape: uniform in +-1/sqrt(in)."""
    bound = weight.shape[-1] ** -0.5
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class Router(nn.Module):
    """Token -> scores over the routable experts, then the configured routing rule."""

    def __init__(
        self,
        dim: int,
        num_routable: int,
        top_k: int,
        kind: str = "softmax",
        *,
        renormalize: bool = False,
        top_p: float | None = None,
        score_bias: bool = False,
        num_groups: int | None = None,
        topk_groups: int | None = None,
        routed_scaling: float = 1.0,
        expert_capacity_factor: float = 1.0,
        bias: bool = False,
        jitter: float = 0.0,
    ):
        super().__init__()
        if kind not in ROUTERS:
            raise ValueError(f"unknown router {kind!r}; accepted: {', '.join(ROUTERS)}")
        if kind == "top_p" and top_p is None:
            raise ValueError("router='top_p' needs top_p in (0, 1]")
        if kind == "gshard_top2" and top_k != 2:
            raise ValueError(f"router='gshard_top2' routes every token to 2 experts: top_k must be 2, got {top_k}")
        self.kind, self.top_k, self.top_p = kind, top_k, top_p
        self.renormalize, self.routed_scaling = renormalize, routed_scaling
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.expert_capacity_factor, self.jitter = expert_capacity_factor, jitter
        self.weight = nn.Parameter(torch.empty(num_routable, dim))
        self.bias = nn.Parameter(torch.zeros(num_routable)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default, as DeepSeek/DiT-MoE's gate
        # DeepSeek-V3's aux-loss-free balancing: a per-expert bias that only affects which experts are chosen.
        self.register_buffer("score_bias", torch.zeros(num_routable) if score_bias else None)
        self.noise = nn.Linear(dim, num_routable, bias=False) if kind == "noisy" else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # Shazeer: start with no learned noise

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            # Switch Transformer's multiplicative jitter on the router input.
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(x_TD.float(), self.weight.float(), None if self.bias is None else self.bias.float())

    def forward(self, x_TD: torch.Tensor, allowed_TE: torch.Tensor | None = None) -> RouterOutput:
        return self.route(self.logits(x_TD), x_TD, allowed_TE)

    def route(self, logits_TE: torch.Tensor, x_TD: torch.Tensor | None,
              allowed_TE: torch.Tensor | None = None) -> RouterOutput:
        """The routing rule on given logits (``x_TD``: only the noisy router reads it). Expert parallelism calls
        it on the logits of every rank's tokens, for expert-choice routing, which picks over the whole batch."""
        if self.kind in ("softmax", "sigmoid"):
            return topk_route(
                logits_TE,
                self.top_k,
                scoring=self.kind,
                renormalize=self.renormalize,
                score_bias_E=self.score_bias,
                num_groups=self.num_groups,
                topk_groups=self.topk_groups,
                scaling=self.routed_scaling,
                allowed_TE=allowed_TE,
            )
        if allowed_TE is not None and self.kind not in ("top_p",):
            raise ValueError(f"an allowed-expert mask works with softmax, sigmoid and top_p routers, not {self.kind!r}")
        if self.kind == "gshard_top2":
            return gshard_top2_route(logits_TE, sample_second=self.training)
        if self.kind == "top_p":
            return top_p_route(logits_TE, self.top_p, max_k=self.top_k, renormalize=self.renormalize, allowed_TE=allowed_TE)
        if self.kind == "expert_choice":
            capacity = capacity_for(logits_TE.shape[0], self.top_k, logits_TE.shape[1], self.expert_capacity_factor)
            return expert_choice_route(logits_TE, min(capacity, logits_TE.shape[0]))
        noise_logits_TE = F.linear(x_TD.float(), self.noise.weight.float())
        return noisy_topk_route(logits_TE, noise_logits_TE, self.top_k, training=self.training)


class MoE(RoutedBlock):
    """A Mixture-of-Experts feed-forward block: ``forward(x[..., dim]) -> [..., dim]``.

    Args:
        dim: model width D.
        hidden_dim: each routed expert's hidden width F.
        num_experts: routed (computed) experts E.
        top_k: experts per token (for top_p: the most a token may use; for expert_choice: the average).
        expert: "swiglu", "geglu", "mlp" or "ternary".
        activation: override the expert kind's nonlinearity (e.g. "gelu_tanh" or "relu" in gated experts);
            the shared experts use it too.
        bias: biases in the routed experts.
        router: "softmax", "sigmoid", "top_p", "expert_choice", "noisy" or "gshard_top2" (DeepSpeed's top-2
            gating, MoE-LLaVA: the second expert sampled with Gumbel noise in training, the two weights
            renormalised after the capacity drop).
        renormalize: divide the chosen weights by their sum (Mixtral); off in DiT-MoE / DeepSeekMoE.
        top_p: probability mass for the top_p router.
        score_bias: keep a DeepSeek-V3 per-expert selection bias buffer (``router.score_bias``).
        num_groups, topk_groups: group-limited routing (DeepSeek-V2/V3).
        routed_scaling: multiply routed weights (DeepSeek-V3's routed_scaling_factor).
        router_bias: a bias in the router's linear map.
        num_shared_experts, shared_hidden_dim: shared experts as one dense gated MLP of width
            ``num_shared_experts * shared_hidden_dim`` (default hidden_dim) that every token uses.
        shared_gate: scale the shared output by ``sigmoid(Linear(D, 1)(x))`` (Qwen2-MoE).
        num_null_experts: routable experts that output zero and cost nothing (UniMoE-Audio; MoE++ zero).
        num_copy_experts, num_constant_experts: MoE++'s copy and constant experts.
        capacity_factor: if set, each computed expert takes at most ``ceil(cf * T * k / E)`` slots.
        eval_capacity_factor: the capacity factor out of training (DeepSpeed's; default: ``capacity_factor``).
        min_capacity: the least capacity an expert gets (DeepSpeed: 4), whatever the factor gives.
        jitter: multiplicative router-input noise in training (Switch).
        aux_loss_coefs: auxiliary losses to add, by name (see ``AUX_LOSSES``) -> coefficient.
        backend: "auto", "reference", "torch" or "triton".
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 2,
        *,
        expert: str = "swiglu",
        activation: str | None = None,
        bias: bool = False,
        router: str = "softmax",
        renormalize: bool = False,
        top_p: float | None = None,
        score_bias: bool = False,
        num_groups: int | None = None,
        topk_groups: int | None = None,
        routed_scaling: float = 1.0,
        router_bias: bool = False,
        num_shared_experts: int = 0,
        shared_hidden_dim: int | None = None,
        shared_gate: bool = False,
        num_null_experts: int = 0,
        num_copy_experts: int = 0,
        num_constant_experts: int = 0,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 1,
        jitter: float = 0.0,
        aux_loss_coefs: dict[str, float] | None = None,
        backend: str = "auto",
    ):
        if expert not in EXPERT_KINDS:
            raise ValueError(f"unknown expert kind {expert!r}; accepted: {', '.join(EXPERT_KINDS)}")
        if min(dim, hidden_dim, num_experts) < 1:
            raise ValueError(f"dim, hidden_dim and num_experts must be >= 1, got {dim}, {hidden_dim}, {num_experts}")
        num_special = num_null_experts + num_copy_experts + num_constant_experts
        if not 1 <= top_k <= num_experts + num_special:
            raise ValueError(f"top_k must be between 1 and the {num_experts + num_special} routable experts, got {top_k}")
        if shared_gate and not num_shared_experts:
            raise ValueError("shared_gate=True needs num_shared_experts >= 1 (it scales the shared experts' output)")
        super().__init__(num_experts, top_k, num_special=num_special, aux_loss_coefs=aux_loss_coefs, backend=backend)
        num_routable = self.num_routable
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_null_experts, self.num_copy_experts = num_null_experts, num_copy_experts
        self.num_constant_experts = num_constant_experts
        if eval_capacity_factor is not None and capacity_factor is None:
            raise ValueError("eval_capacity_factor needs a capacity_factor (the one used in training)")
        if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 1:
            raise ValueError(f"min_capacity must be an integer >= 1, got {min_capacity!r}")
        self.expert_kind, self.capacity_factor = expert, capacity_factor
        self.eval_capacity_factor, self.min_capacity = eval_capacity_factor, min_capacity
        self.activation, self.gated = EXPERT_KINDS[expert]
        if activation is not None:
            activation_fn(activation)  # validates the name
            self.activation = activation

        self.router = Router(
            dim, num_routable, top_k, router, renormalize=renormalize, top_p=top_p, score_bias=score_bias,
            num_groups=num_groups, topk_groups=topk_groups, routed_scaling=routed_scaling, bias=router_bias,
            jitter=jitter,
        )
        n_in = 2 * hidden_dim if self.gated else hidden_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, n_in, dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b_in = nn.Parameter(torch.zeros(num_experts, n_in)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.shared = None
        if num_shared_experts:
            shared_width = num_shared_experts * (shared_hidden_dim or hidden_dim)
            self.shared = GatedMLP(dim, shared_width, self.activation, self.gated)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        if num_constant_experts:
            self.constant_vectors = nn.Parameter(torch.zeros(num_constant_experts, dim))
            self.constant_mix = nn.Linear(dim, 2 * num_constant_experts, bias=False)
        self._packed = None  # set by freeze(): prepacked expert weights for no-grad CPU calls
        self._expert_parallel: _ExpertParallel | None = None  # set by shard_experts()
        self.reset_expert_parameters()

    @classmethod
    def from_hf(cls, block: nn.Module, backend: str = "auto") -> "MoE":
        """A moezoo MoE with the weights and routing of a transformers Mixtral, Qwen2-MoE or DeepSeek-V3 MoE
        block; its output matches the block's to fp32 precision."""
        from .hf_convert import moe_from_hf

        return moe_from_hf(block, backend=backend)

    def reset_expert_parameters(self) -> None:
        """Each expert initialised like an nn.Linear of its shape (uniform, bound 1/sqrt(fan_in))."""
        for weight in (self.w_in, self.w_out):
            init_like_linear_(weight)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, experts={self.num_experts}, top_k={self.top_k}, "
            f"expert={self.expert_kind!r}, router={self.router.kind!r}, null={self.num_null_experts}, "
            f"copy={self.num_copy_experts}, constant={self.num_constant_experts}, backend={self.backend!r}"
        )

    def forward(self, x: torch.Tensor, allowed_experts: torch.Tensor | None = None) -> torch.Tensor:
        """Route every token of ``x [..., dim]``; ``allowed_experts [..., num_routable]`` (bool) optionally
        restricts each token to a subset of experts (modality-aware routing)."""
        if not x.dtype.is_floating_point:
            raise TypeError(f"MoE input must be a floating tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE input must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        if allowed_experts is None and self._expert_parallel is None:
            # the decode kernel reads any contiguous [..., D] as rows: no reshape, a few µs less per step
            prepared = self._decode_kernel(x)
            y = None if prepared is None else self._forward_decode_kernel(prepared, x, lead_shape)
            if y is not None:
                return y
        x_TD = x.reshape(-1, self.dim)
        allowed_TE = None
        if allowed_experts is not None:
            if allowed_experts.shape != (*lead_shape, self.num_routable):
                raise ValueError(
                    f"allowed_experts must have shape {(*lead_shape, self.num_routable)}, "
                    f"got {tuple(allowed_experts.shape)}"
                )
            allowed_TE = allowed_experts.reshape(-1, self.num_routable).bool()

        if self._expert_parallel is not None:
            return self._forward_expert_parallel(x_TD, allowed_TE, lead_shape).reshape(x.shape)
        routed = self.router(x_TD, allowed_TE)
        ids_TK, weights_TK = routed.ids_TK, routed.weights_TK.to(x.dtype)
        num_tokens, top_k = ids_TK.shape
        capacity = self._capacity(num_tokens, top_k)
        if capacity is not None and capacity >= num_tokens:
            # Every router here gives a token distinct experts, so an expert receives at most one slot per token:
            # with room for every token nothing can drop, and the plan need not count (decoding's case).
            capacity = None
        plan = build_plan(ids_TK, self.num_experts, capacity=capacity)
        if self.router.kind == "gshard_top2":  # DeepSpeed renormalises the two gates after the drop
            weights_TK = renormalize_kept(weights_TK, plan.kept_TK)
        # On the torch backend the shared expert mostly runs as its own dense MLP: packing it for the kernel
        # would copy its gate and up weights into one tensor at every call (shared_apart_pays).
        shared_apart = self.shared is not None and self._shared_apart(x_TD, top_k)
        y_TD = expert_mlp(
            x_TD, weights_TK, plan, *self._expert_weights(), b_in_EN=self.b_in, b_out_ED=self.b_out,
            activation=self.activation, gated=self.gated, backend=self.backend,
            shared=None if shared_apart else self._shared_expert(x_TD), packed=self._live_packed(),
        )
        if shared_apart:
            y_TD = y_TD + self._shared_output(x_TD)
        if self.num_copy_experts or self.num_constant_experts:
            y_TD = y_TD + self._special_experts(x_TD, ids_TK, weights_TK)
        self._record(routed, plan, lead_shape)
        return y_TD.reshape(x.shape)

    def _decode_kernel(self, x: torch.Tensor) -> cpu_decode.PreparedLayer | None:
        """The prepared native call (``kernels.cpu_decode``) when this call can be one (``cpu_decode.fits``) and
        the layer is the kernel's: a softmax/sigmoid top-k router without groups (DeepSpeed's top-2 gating in
        eval is its softmax top-2 renormalised), plain experts without biases, a shared expert without gate, no
        special experts, and nothing that capacity could drop. Read through the modules' dicts: at one token
        every µs shows."""
        router = self._modules["router"]
        kind = router.kind
        if (kind not in ("softmax", "sigmoid", "gshard_top2") or router.num_groups is not None or self.num_special
                or self.expert_kind == "ternary" or self.shared_gate is not None):
            return None
        tensors = self._decode_tensors(router)
        if not cpu_decode.fits(x, self.top_k, self.training, self.backend, tensors):
            return None
        if self.capacity_factor is not None:
            num_tokens = x.numel() // self.dim
            if self._capacity(num_tokens, self.top_k) < num_tokens:
                return None
        if self._packed is not None:
            self._live_packed()  # an in-place update drops the oneDNN copy (``frozen`` says so), as the eager path does
        frozen = self._decode_frozen  # frozen weights are packed for the kernel too, again when a version moves
        return cpu_decode.prepared_for(self._decode_prepared, kind, tensors,
                                       lambda: self._prepare_decode(router, tensors, frozen), versions=frozen)

    def _decode_tensors(self, router) -> tuple:
        """Router weight, bias, score bias, w_in, w_out, shared gate, up, down (``PreparedLayer``'s order)."""
        # dict lookups, not attribute access: nn.Module.__getattr__ costs about a µs (an unset one is a plain None)
        params, shared = self._parameters, self._modules.get("shared")
        gate = up = down = None
        if shared is not None:
            layers = shared._modules
            gate = None if layers.get("gate_proj") is None else layers["gate_proj"]._parameters["weight"]
            up, down = layers["up_proj"]._parameters["weight"], layers["down_proj"]._parameters["weight"]
            if any(layer is not None and layer._parameters["bias"] is not None for layer in layers.values()):
                return ()  # a shared MLP with biases: not the kernel's
        if params.get("b_in") is not None or params.get("b_out") is not None:
            return ()
        return (router._parameters["weight"], router._parameters.get("bias"), router._buffers.get("score_bias"),
                params["w_in"], params["w_out"], gate, up, down)

    def _prepare_decode(self, router, tensors: tuple, packed: bool) -> cpu_decode.PreparedLayer:
        router_w, router_b, score_bias, w_in, w_out, gate, up, down = (
            None if t is None else t.detach() for t in tensors)
        return cpu_decode.PreparedLayer(
            router_w, router_b, score_bias, w_in, w_out, None if up is None else (gate, up, down), top_k=self.top_k,
            activation=self.activation, gated=self.gated, sigmoid_scoring=router.kind == "sigmoid",
            renormalize=router.renormalize or router.kind == "gshard_top2", scaling=float(router.routed_scaling),
            packed=packed)

    def _forward_decode_kernel(self, prepared, x: torch.Tensor, lead_shape) -> torch.Tensor | None:
        """``forward`` of ``x [..., D]`` as one native call; None when a router logit is not finite (the eager
        path says so)."""
        out = prepared.run(x if x.is_contiguous() else x.contiguous())  # fits() and forward checked it
        if out is None:
            return None
        y, ids_TK, weights_TK, probs_TE, logits_TE = out
        self.record_routing(RouterOutput(ids_TK, weights_TK, probs_TE, logits_TE), lead_shape)
        return y

    def _capacity(self, num_tokens: int, top_k: int) -> int | None:
        """Slots each computed expert may take for ``num_tokens`` tokens of ``top_k`` slots (None: no limit)."""
        if self.capacity_factor is None:
            return None
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return max(self.min_capacity, capacity_for(num_tokens, top_k, self.num_experts, factor))

    def _shared_apart(self, x_TD: torch.Tensor, top_k: int) -> bool:
        """Whether the shared experts run apart from ``expert_mlp`` for this call: the torch backend and
        ``shared_apart_pays`` (always at few tokens; at any size unless oneDNN's GEMMs are in use)."""
        return resolve_backend(self.backend, x_TD.device) == "torch" and shared_apart_pays(x_TD.shape[0], top_k)

    # ------------------------------------------------------------------------------------------ expert parallelism

    def shard_experts(self, group=None, *, routing_group=None, pad_to_capacity: bool = False) -> "MoE":
        """Expert parallelism: keep only this rank's ``num_experts / R`` experts of the R-rank ``group`` (None:
        the default group; rank r keeps experts ``r*E/R .. (r+1)*E/R - 1``), and from now on send each token's
        slots to the rank that owns its expert (``moezoo.kernels.expert_parallel``). Every rank of ``group``
        must call it, and then call ``forward`` together, each with its own tokens (any number per rank, none
        included).

        ``routing_group`` (default ``group``): the ranks whose tokens routing treats as one batch, as one process
        would: the capacity, expert-choice picks, the routing record and the aux losses (their tensors are
        all-gathered over it). Pass the whole data-parallel group to make R processes compute what one process
        computes on their concatenated batch. ``pad_to_capacity``: capacity-padded equal splits (DeepSpeed,
        Tutel) instead of exact ones. The kept expert parameters are marked for ``reduce_gradients``."""
        if self._expert_parallel is not None:
            raise RuntimeError("this MoE's experts are already sharded")
        shard = ep.expert_shard(self.num_experts, group)
        mine = slice(shard.experts.start, shard.experts.stop)
        for name in EXPERT_PARAMETERS:
            full = getattr(self, name)
            if full is not None:
                local = nn.Parameter(full.detach()[mine].clone(), requires_grad=full.requires_grad)
                setattr(self, name, ep.mark_expert_parameter(local))
        self._packed = None
        self._expert_parallel = _ExpertParallel(shard, group if routing_group is None else routing_group,
                                                pad_to_capacity)
        return self

    def _forward_expert_parallel(self, x_TD: torch.Tensor, allowed_TE, lead_shape) -> torch.Tensor:
        """``forward`` with sharded experts: route locally (expert-choice: over the routing group's logits),
        decide capacity over the routing group's tokens as one process would, exchange the rows, add the shared
        and special experts locally, and record the routing group's routing."""
        par, num_tokens = self._expert_parallel, x_TD.shape[0]
        shapes = ep.gather_token_shapes(lead_shape, par.routing_group, x_TD.device)  # ranks may differ, even 0
        sizes = [tokens for tokens, _ in shapes]
        group_tokens, first = sum(sizes), sum(sizes[:torch.distributed.get_rank(par.routing_group)])
        mine = slice(first, first + num_tokens)  # this rank's rows of the gathered batch
        if self.router.kind == "expert_choice":  # picks tokens over the whole batch
            logits_TE = ep.all_gather_rows(self.router.logits(x_TD), par.routing_group, sizes)
            routed_all = self.router.route(logits_TE, None, allowed_TE)  # refuses a mask, as forward does
            routed = ep.router_output_rows(routed_all, mine)
        else:
            routed = self.router(x_TD, allowed_TE)
            routed_all = ep.gather_router_output(routed, par.routing_group, sizes)
            routed = ep.pad_slots(routed, routed_all.ids_TK.shape[1])  # top-p: as wide as the group's widest
        weights_TK = routed.weights_TK.to(x_TD.dtype)
        capacity = self._capacity(group_tokens, routed.ids_TK.shape[1])
        plan_all = build_plan(routed_all.ids_TK, self.num_experts, capacity=capacity)
        plan = build_plan(torch.where(plan_all.kept_TK[mine], routed.ids_TK, -1), self.num_experts)
        if self.router.kind == "gshard_top2":
            weights_TK = renormalize_kept(weights_TK, plan.kept_TK)
        pad_to = None
        if par.pad_to_capacity:
            pad_to = capacity if capacity is not None else ep.largest_count(plan, par.shard.group)
        y_TD = ep.expert_parallel_mlp(
            x_TD, weights_TK, plan, *self._expert_weights(), par.shard, b_in_LN=self.b_in, b_out_LD=self.b_out,
            activation=self.activation, gated=self.gated, backend=self.backend, pad_to=pad_to)
        if self.shared is not None:
            y_TD = y_TD + self._shared_output(x_TD)
        y_TD = y_TD + self._special_experts(x_TD, routed.ids_TK, weights_TK)
        self._record(routed_all, plan_all, ep.concatenated_shape(shapes))
        return y_TD

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A sharded block loads a one-process (full) checkpoint by taking its own experts' rows: the re-shard.
        if self._expert_parallel is not None:
            mine = slice(self._expert_parallel.shard.experts.start, self._expert_parallel.shard.experts.stop)
            for name in EXPERT_PARAMETERS:
                full = state_dict.get(prefix + name)
                if full is not None and getattr(self, name) is not None and full.shape[0] == self.num_experts:
                    state_dict[prefix + name] = full[mine]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gather_experts(self) -> dict[str, torch.Tensor]:
        """All ``num_experts`` experts' weights of a sharded block, by parameter name (collective over its
        expert-parallel group): what one process's ``state_dict`` holds."""
        group = self._expert_parallel.shard.group
        return {name: ep.all_gather_rows(getattr(self, name).detach(), group)
                for name in EXPERT_PARAMETERS if getattr(self, name) is not None}

    @property
    def expert_parallel(self) -> bool:
        """Whether the experts are sharded over an expert-parallel group (``shard_experts``)."""
        return self._expert_parallel is not None

    # ------------------------------------------------------------------------------------------ inference

    def freeze(self) -> None:
        """Pack the routed experts' weights once into the CPU backend's blocked layout for no-grad calls (as
        torch.compile's freezing or IPEX's ``optimize``). The packed copy is used only while ``w_in`` / ``w_out``
        are the same tensors with the same storage and version counter: an in-place update, a new Parameter or
        ``load_state_dict`` drops it, and the layer computes on its live weights. Edits through ``.data``
        bypass the version counter: after one, call :meth:`unfreeze` (or ``freeze`` again). Ternary experts
        (weights quantised per call) are not packed. The decode kernel (``kernels.cpu_decode``) of a frozen block
        multiplies its own panel copies of the experts and shared MLP, packed again whenever a version moves."""
        self._packed = None
        if self.expert_kind != "ternary":
            self._packed = pack_expert_weights(self.w_in, self.w_out)
        super().freeze()

    def unfreeze(self) -> None:
        self._packed = None
        super().unfreeze()

    @property
    def frozen(self) -> bool:
        return self._packed is not None

    def _live_packed(self):
        """The packed copy while it still matches the live weights; a stale one is dropped for good."""
        if self._packed is not None and not self._packed.matches(self.w_in, self.w_out):
            self._packed = None
        return self._packed

    def _shared_expert(self, x_TD: torch.Tensor) -> SharedExpert | None:
        """The shared experts as one always-on expert for ``expert_mlp`` (which runs it in the same parallel
        walk as the routed experts on CPU), scaled per token by the sigmoid gate if there is one."""
        if self.shared is None:
            return None
        scale_T = None if self.shared_gate is None else torch.sigmoid(self.shared_gate(x_TD)).squeeze(-1)
        return self.shared.as_shared_expert(scale_T)

    def _shared_output(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The shared experts' output computed apart from the routed ones (their own dense MLP), gated or not."""
        shared_TD = self.shared(x_TD)
        return shared_TD if self.shared_gate is None else torch.sigmoid(self.shared_gate(x_TD)) * shared_TD

    def _expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.expert_kind == "ternary":
            return ternary_ste(self.w_in), ternary_ste(self.w_out)
        return self.w_in, self.w_out

    def _special_experts(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Copy and constant experts (null experts add nothing): their weighted outputs summed per token."""
        out_TD = torch.zeros_like(x_TD)
        first_copy = self.num_experts + self.num_null_experts
        if self.num_copy_experts:
            in_copy_TK = (ids_TK >= first_copy) & (ids_TK < first_copy + self.num_copy_experts)
            out_TD = out_TD + (weights_TK * in_copy_TK).sum(-1, keepdim=True) * x_TD
        if self.num_constant_experts:
            first_constant = first_copy + self.num_copy_experts
            which_TK = ids_TK - first_constant
            in_const_TK = (which_TK >= 0) & (which_TK < self.num_constant_experts)
            # Each constant expert c: a1 * x + a2 * v_c with [a1, a2] = softmax(W_c x).
            mix_TC2 = self.constant_mix(x_TD).view(-1, self.num_constant_experts, 2).softmax(-1)
            weight_TC = x_TD.new_zeros(x_TD.shape[0], self.num_constant_experts)
            weight_TC = weight_TC.scatter_add(1, which_TK.clamp(min=0), weights_TK * in_const_TK)
            out_TD = out_TD + (weight_TC * mix_TC2[..., 0]).sum(-1, keepdim=True) * x_TD
            out_TD = out_TD + (weight_TC * mix_TC2[..., 1]) @ self.constant_vectors
        return out_TD

    def _record(self, routed: RouterOutput, plan, lead_shape) -> None:
        """The routing record, with the computed experts' load after capacity and the slots it dropped (counted
        when the record is summarized: see ``RoutingRecord``)."""
        num_experts, num_routable = self.num_experts, self.num_routable

        def load() -> torch.Tensor:
            load_E = losses.expert_counts(routed.ids_TK, num_routable).float()
            load_E[:num_experts] = plan.counts_E.float()
            return load_E

        def dropped() -> int:
            return int(((routed.ids_TK >= 0) & (routed.ids_TK < num_experts)).sum()) - plan.num_dispatched

        self.record_routing(routed, lead_shape, load_E=load, dropped=dropped)

    def special_labels(self) -> list[str]:
        kinds = [("null", self.num_null_experts), ("copy", self.num_copy_experts), ("constant", self.num_constant_experts)]
        return [f"{kind} {i}" for kind, count in kinds for i in range(count)]


@dataclasses.dataclass(frozen=True)
class _ExpertParallel:
    """A sharded MoE's setting: its shard of the expert-parallel group, the group routing treats as one batch,
    and whether the splits are capacity-padded."""

    shard: ep.ExpertShard
    routing_group: object
    pad_to_capacity: bool


def shard_model_experts(model: nn.Module, group=None, *, routing_group=None,
                        pad_to_capacity: bool = False) -> list[str]:
    """:meth:`MoE.shard_experts` on every MoE block of ``model`` (collective: every rank of ``group`` calls it);
    returns the names of the expert parameters now sharded (e.g. for DDP's parameters to ignore)."""
    names = []
    for name, block in routed_blocks(model):
        if isinstance(block, MoE):
            block.shard_experts(group, routing_group=routing_group, pad_to_capacity=pad_to_capacity)
            names += [f"{name}.{p}" if name else p for p in EXPERT_PARAMETERS if getattr(block, p) is not None]
    return names


def gather_expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded MoE block's experts gathered whole (collective over each
    block's expert-parallel group): the checkpoint one process saves and loads; a sharded model loads it back
    (each block keeps its own rows)."""
    state = model.state_dict()
    for name, block in routed_blocks(model):
        if isinstance(block, MoE) and block.expert_parallel:
            for param, full in block.gather_experts().items():
                state[f"{name}.{param}" if name else param] = full
    return state
