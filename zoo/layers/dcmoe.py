"""UniMoE-Audio's dynamic-capacity MoE feed-forward layer (arXiv 2510.13344; official code HITsz-TMG/Uni-MoE,
folder UniMoE-Audio, ``utils/UniMoE_Audio_core.py: UniMoEAudioSparseMoeBlock`` with ``utils/config.json``).

For every token ``x`` (``N = num_experts + num_null_experts`` dynamic experts, ``S`` shared experts):

1. One bias-free linear gate scores all ``N + S`` experts, in float32: ``l = W_g x`` (rows: the routed experts,
   the null experts, the shared experts). In training the gate's input is ``x * U(1 - input_jitter,
   1 + input_jitter)`` elementwise; the experts always see ``x``.
2. Top-p over the N dynamic logits only: ``k = #(sorted cumulative softmax < top_p) + 1``, the k most probable
   dynamic experts. Null experts are in this pool: a token may choose 0 routed experts.
3. The chosen experts' weights ``w`` (summing to 1): each one's near-tie multiplier, renormalised
   (:func:`moezoo.kernels.routing.top_p_near_tie_route`; ``router_jitter`` is its tie tolerance).
4. Shared experts are always on but gated: ``g = softmax(l masked to the chosen dynamic experts and the S
   shared ones)``. Shared expert s is weighted by ``g_s``; the chosen dynamic experts share their total mass
   ``m = sum of g over the chosen dynamic experts`` by ``w``: routed expert e gets ``w_e * m``. A null expert's
   part is nothing (it outputs zero and is never computed).
5. ``y = sum over chosen routed e of w_e m SwiGLU_e(x) + sum_s g_s SwiGLU_s(x)``, both sums through
   ``kernels.expert_mlp`` (the shared experts as a second call with fixed ids and weights ``g_s``).

Balance loss (``aux_loss_coefs["chosen_balance"]``, :func:`moezoo.kernels.losses.chosen_set_balance_loss`):
``N * sum_i f_i P_i`` over the dynamic experts, ``f_i`` the fraction of tokens that chose i and ``P_i`` the mean
of the softmax restricted to each token's chosen set, computed before any capacity drop. The official model
multiplies the mean over layers by a weight annealed linearly 0.025 -> 0.001 over 10k steps; here each layer's
coefficient is ``weight / number of layers`` (:func:`set_aux_weight`), so the sum :func:`total_aux_loss` takes
is that mean times the weight, and :func:`anneal_aux_weight` gives the weight of a step.

Optional token dropping (official ``token_drop``, off in the shipped config; capacity factor 6, at least 8): each
dynamic expert keeps the ``max(ceil(T / N * capacity_factor), min_capacity)`` tokens with the highest logit for it
among those that chose it (the official "probs" drop policy); a token's remaining weights are renormalised.

Where this differs from the official code, and why:

- Only its shipped router is here (``ignore_differentiable_router=true``: the deterministic near-tie weights in
  training too). The SparseMixer estimator it switches off (Gumbel sampling, a custom backward) is not.
- The top-p boundary is :func:`~moezoo.kernels.routing.top_p_route`'s: cumulative sums in float64 and at most
  N experts. The official float32 sum can land a hair below 1 with ``top_p = 1``, giving ``k = N + 1``, which no
  group of its loop handles: such a token gets no dynamic expert at all (29% of 1M random tokens over 9 experts).
  Elsewhere they agree except for sums within float32 rounding of ``top_p`` (no token of 3M random ones over 9
  experts at ``top_p = 0.7``, logit scales 0.1-3, got another k).
- The gate runs in float32 in inference too (the official code: only in training, bf16 otherwise).
- Input jitter multiplies the gate's input only. The official code multiplies in place the float32 copy it
  makes of bf16 hidden states, so in its bf16 training the experts see clean inputs, as here (with float32
  hidden states the in-place product would reach the experts too, through the alias).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.kernels import activation_fn, cpu_decode, expert_mlp, losses, pack_expert_weights
from moezoo.kernels.plan import build_plan
from moezoo.kernels.routing import RouterOutput, top_p_near_tie_route

from .routed import RoutedBlock, routed_blocks

BALANCE_LOSS = "chosen_balance"
RENORM_EPS = 1e-6  # the official renormalisation's epsilon: weights / (sum + 1e-6)


class DynamicCapacityMoE(RoutedBlock):
    """UniMoE-Audio's dynamic-capacity MoE FFN: ``forward(x[..., dim]) -> [..., dim]`` (formulas in the module
    docstring). Defaults are the official configuration's.

    Args:
        dim: model width D.
        hidden_dim: a routed expert's hidden width F (official 2752).
        num_experts: routed SwiGLU experts (official 8).
        num_null_experts: parameter-free experts that output zero, in the top-p pool (official 1).
        num_shared_experts: always-on, gated SwiGLU experts (official 2).
        shared_hidden_dim: a shared expert's hidden width (default: half of ``hidden_dim``, as 1376 of 2752).
        top_p: probability mass of the top-p selection over the dynamic experts, in (0, 1] (official 0.7).
        router_jitter: the relative logit tolerance of the near-tie weights (official ``router_jitter_noise`` 0.01;
            with the shipped router it adds no noise).
        input_jitter: multiplicative uniform noise on the gate's input in training, in [0, 1) (official 0.01).
        capacity_factor, min_capacity, token_drop: token dropping by capacity (official 6.0, 8, off).
        activation: the experts' nonlinearity (official ``hidden_act`` silu).
        gate_init_std: the gate's normal init (official ``initializer_range`` 0.02).
        aux_loss_coef: the balance loss coefficient of this layer (the official weight starts at 0.025 and is
            averaged over layers: give ``weight / num_layers``, or call :func:`set_aux_weight`).
        backend: the expert-compute backend ("auto", "reference", "torch" or "triton").

    Parameters: ``gate.weight [N + S, D]``, ``w_in [E, 2F, D]`` (gate rows, then up rows), ``w_out [E, D, F]``,
    ``shared_w_in [S, 2F_s, D]``, ``shared_w_out [S, D, F_s]``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 8,
        *,
        num_null_experts: int = 1,
        num_shared_experts: int = 2,
        shared_hidden_dim: int | None = None,
        top_p: float = 0.7,
        router_jitter: float = 0.01,
        input_jitter: float = 0.01,
        capacity_factor: float = 6.0,
        min_capacity: int = 8,
        token_drop: bool = False,
        activation: str = "silu",
        gate_init_std: float = 0.02,
        aux_loss_coef: float = 0.025,
        backend: str = "auto",
    ):
        if shared_hidden_dim is None:
            shared_hidden_dim = max(1, hidden_dim // 2)
        _check_ints(dim=(dim, 1), hidden_dim=(hidden_dim, 1), num_experts=(num_experts, 1),
                    num_null_experts=(num_null_experts, 0), num_shared_experts=(num_shared_experts, 0),
                    shared_hidden_dim=(shared_hidden_dim, 1), min_capacity=(min_capacity, 0))
        _check_number("top_p", top_p, 0.0, 1.0, low_open=True)
        _check_number("router_jitter", router_jitter, 0.0, math.inf)
        _check_number("input_jitter", input_jitter, 0.0, 1.0, high_open=True)
        _check_number("capacity_factor", capacity_factor, 0.0, math.inf, low_open=True)
        _check_number("gate_init_std", gate_init_std, 0.0, math.inf)
        if not isinstance(token_drop, bool):
            raise ValueError(f"token_drop must be a bool, got {token_drop!r}")
        activation_fn(activation)  # validates the name
        num_dynamic = num_experts + num_null_experts
        super().__init__(num_experts, num_dynamic, num_special=num_null_experts,
                         aux_loss_coefs={BALANCE_LOSS: aux_loss_coef}, backend=backend)
        self.dim, self.hidden_dim, self.shared_hidden_dim = dim, hidden_dim, shared_hidden_dim
        self.num_null_experts, self.num_shared_experts = num_null_experts, num_shared_experts
        self.top_p, self.router_jitter, self.input_jitter = top_p, router_jitter, input_jitter
        self.capacity_factor, self.min_capacity, self.token_drop = capacity_factor, min_capacity, token_drop
        self.activation, self.gate_init_std = activation, gate_init_std

        self.gate = nn.Linear(dim, num_dynamic + num_shared_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.shared_w_in = self.shared_w_out = None
        if num_shared_experts:
            self.shared_w_in = nn.Parameter(torch.empty(num_shared_experts, 2 * shared_hidden_dim, dim))
            self.shared_w_out = nn.Parameter(torch.empty(num_shared_experts, dim, shared_hidden_dim))
        self._packed = self._shared_packed = None  # set by freeze()
        self.reset_parameters()

    @property
    def num_dynamic(self) -> int:
        """The top-p pool: routed and null experts."""
        return self.num_experts + self.num_null_experts

    def reset_parameters(self) -> None:
        """The gate ~ N(0, gate_init_std^2) (the official init); each expert matrix like an nn.Linear of its shape
        (uniform, bound 1/sqrt(fan_in))."""
        nn.init.normal_(self.gate.weight, 0.0, self.gate_init_std)
        for weight in (self.w_in, self.w_out, self.shared_w_in, self.shared_w_out):
            if weight is not None:
                bound = weight.shape[-1] ** -0.5
                nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, experts={self.num_experts}, null={self.num_null_experts}, "
            f"shared={self.num_shared_experts}x{self.shared_hidden_dim}, top_p={self.top_p}, "
            f"token_drop={self.token_drop}, backend={self.backend!r}"
        )

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point:
            raise TypeError(f"DynamicCapacityMoE input must be a floating tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"DynamicCapacityMoE input must have last dimension {self.dim}, "
                             f"got shape {tuple(x.shape)}")
        prepared = self._decode_kernel(x)
        if prepared is not None:  # a decoding step in one native call (None back: a non-finite logit, said below)
            out = prepared.run(x if x.is_contiguous() else x.contiguous())  # fits() and the checks above
            if out is not None:
                return self._record_decode(out, x.shape[:-1])
        x_TD = x.reshape(-1, self.dim)
        logits_TG = self._gate_logits(x_TD)
        routed = top_p_near_tie_route(logits_TG[:, : self.num_dynamic], self.top_p, tie_tolerance=self.router_jitter,
                                      renorm_eps=RENORM_EPS)
        used_TK = routed.ids_TK >= 0
        kept_TK, weights_TK = used_TK, routed.weights_TK
        if self.token_drop:
            kept_TK = self._within_capacity(routed.ids_TK, used_TK, routed.logits_TE)
            weights_TK = _renormalise(weights_TK * kept_TK)
        shares_TS = None
        if self.num_shared_experts:
            weights_TK, shares_TS = self._gated_shares(logits_TG, routed.ids_TK, kept_TK, weights_TK)

        # Null and dropped slots are not dispatched (ids outside [0, num_experts)).
        dispatch_TK = torch.where(kept_TK, routed.ids_TK, torch.full_like(routed.ids_TK, -1))
        plan = build_plan(dispatch_TK, self.num_experts)
        y_TD = expert_mlp(x_TD, weights_TK.to(x.dtype), plan, self.w_in, self.w_out, activation=self.activation,
                          backend=self.backend, packed=self._live_packed())
        if shares_TS is not None:
            y_TD = y_TD + self._shared_experts(x_TD, shares_TS.to(x.dtype))

        record = RouterOutput(routed.ids_TK, weights_TK, routed.probs_TE, routed.logits_TE)
        # the load and the drop count as functions: a no-grad record counts them only when read (no host sync)
        self.record_routing(record, x.shape[:-1],
                            load_E=lambda: losses.expert_counts(dispatch_TK, self.num_dynamic).float(),
                            dropped=lambda: int((used_TK & ~kept_TK).sum()))
        return y_TD.reshape(x.shape)

    def _decode_kernel(self, x: torch.Tensor):
        """The prepared native call (``kernels.cpu_decode.PreparedDynamicLayer``) when this call can be one
        (``cpu_decode.fits``, counted as two slots a token like the top-2 layers) and nothing could be dropped."""
        params = self._parameters
        tensors = (self._modules["gate"]._parameters["weight"], params["w_in"], params["w_out"],
                   params.get("shared_w_in"), params.get("shared_w_out"))
        if not cpu_decode.fits(x, 2, self.training, self.backend, tensors):
            return None
        num_tokens = x.numel() // self.dim
        if self.token_drop and self._capacity(num_tokens) < num_tokens:
            return None
        frozen = self._decode_frozen
        return cpu_decode.prepared_for(self._decode_prepared, "dynamic", tensors, lambda: cpu_decode.PreparedDynamicLayer(
            *(None if t is None else t.detach() for t in tensors), num_dynamic=self.num_dynamic, top_p=self.top_p,
            tie_tolerance=self.router_jitter, renorm_eps=RENORM_EPS, activation=self.activation, packed=frozen),
            versions=frozen)

    def _record_decode(self, out: tuple, tokens_shape) -> torch.Tensor:
        """The kernel's output returned, its routing recorded as ``forward`` records it (load: every chosen
        dynamic slot, null ones included; nothing dropped)."""
        y, ids_TK, weights_TK, probs_TN, logits_TN = out
        self.record_routing(RouterOutput(ids_TK, weights_TK, probs_TN, logits_TN), tokens_shape)  # load: by default
        return y

    def _gate_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """float32 logits over the dynamic then shared experts; the input jittered in training."""
        x_TD = x_TD.float()
        if self.training and self.input_jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        return F.linear(x_TD, self.gate.weight.float())

    def _within_capacity(self, ids_TK: torch.Tensor, used_TK: torch.Tensor, logits_TN: torch.Tensor) -> torch.Tensor:
        """Which chosen slots survive the capacity: per dynamic expert, the tokens with the highest logit for it
        among those that chose it (the official "probs" policy)."""
        capacity = self._capacity(logits_TN.shape[0])
        chosen_TN = _chosen_mask(ids_TK, used_TK, self.num_dynamic)
        candidates_TN = logits_TN.detach().masked_fill(~chosen_TN, torch.finfo(logits_TN.dtype).min)
        keep_TN = torch.zeros_like(chosen_TN).scatter_(0, candidates_TN.topk(capacity, dim=0).indices, True) & chosen_TN
        return keep_TN.gather(1, ids_TK.clamp(min=0)) & used_TK

    def _capacity(self, num_tokens: int) -> int:
        """Tokens each dynamic expert keeps with token dropping: ``max(ceil(T / N * capacity_factor),
        min_capacity)``, at most T."""
        return min(max(math.ceil(num_tokens / self.num_dynamic * self.capacity_factor), self.min_capacity), num_tokens)

    def _gated_shares(self, logits_TG, ids_TK, kept_TK, weights_TK):
        """The softmax over the kept dynamic experts and the shared ones: the routed weights scaled by the dynamic
        mass, and each shared expert's share."""
        visible_TG = F.pad(_chosen_mask(ids_TK, kept_TK, self.num_dynamic), (0, self.num_shared_experts), value=True)
        g_TG = logits_TG.masked_fill(~visible_TG, float("-inf")).softmax(-1)
        dynamic_mass_T1 = g_TG[:, : self.num_dynamic].sum(-1, keepdim=True)
        return weights_TK * dynamic_mass_T1, g_TG[:, self.num_dynamic :]

    def _shared_experts(self, x_TD: torch.Tensor, shares_TS: torch.Tensor) -> torch.Tensor:
        """Every token through every shared expert, weighted by its share: one ``expert_mlp`` call with fixed ids."""
        ids_TS = torch.arange(self.num_shared_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        plan = build_plan(ids_TS, self.num_shared_experts)
        packed = self._shared_packed
        if packed is not None and not packed.matches(self.shared_w_in, self.shared_w_out):
            packed = self._shared_packed = None
        return expert_mlp(x_TD, shares_TS, plan, self.shared_w_in, self.shared_w_out, activation=self.activation,
                          backend=self.backend, packed=packed)

    # ------------------------------------------------------------------------------------------ reading the routing

    def experts_per_token(self, count_null: bool = True) -> torch.Tensor:
        """How many experts each token of the last forward chose (int64, shaped like the input's leading dims):
        routed and null experts, or routed only with ``count_null=False``. Shared experts are not counted (every
        token uses all of them); slots a capacity dropped still count (``routing.dropped`` says how many)."""
        if self.routing is None:
            raise RuntimeError("no routing recorded yet: run a forward first")
        ids_TK = self.routing.ids_TK
        upper = self.num_dynamic if count_null else self.num_experts
        return ((ids_TK >= 0) & (ids_TK < upper)).sum(-1).reshape(self.routing.tokens_shape)

    def special_labels(self) -> list[str]:
        return [f"null {i}" for i in range(self.num_null_experts)]

    # ------------------------------------------------------------------------------------------ inference

    def freeze(self) -> None:
        """Pack the routed and the shared experts' weights once for no-grad CPU calls (see ``MoE.freeze``: a
        packed copy is dropped when its weights change in place, are replaced or reloaded)."""
        self._packed = pack_expert_weights(self.w_in, self.w_out)
        if self.num_shared_experts:
            self._shared_packed = pack_expert_weights(self.shared_w_in, self.shared_w_out)
        super().freeze()

    def unfreeze(self) -> None:
        self._packed = self._shared_packed = None
        super().unfreeze()

    @property
    def frozen(self) -> bool:
        return self._packed is not None

    def _live_packed(self):
        if self._packed is not None and not self._packed.matches(self.w_in, self.w_out):
            self._packed = None
        return self._packed


# ----------------------------------------------------------------------------------------------------------
# The annealed balance-loss weight
# ----------------------------------------------------------------------------------------------------------


def anneal_aux_weight(step: int, total_steps: int, start: float = 0.025, end: float = 0.001) -> float:
    """The balance-loss weight at ``step``: linear from ``start`` (step 0) to ``end`` (step ``total_steps``), then
    ``end`` (the official ``cur_aux_weight``: 0.025 -> 0.001 over ``l_aux_weight_decay_steps`` = 10k steps)."""
    for name, value, least in (("step", step, 0), ("total_steps", total_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if step >= total_steps:
        return float(end)
    return start - (start - end) * step / total_steps


def set_aux_weight(model: nn.Module, weight: float) -> int:
    """Give every :class:`DynamicCapacityMoE` in ``model`` the balance coefficient ``weight / L`` (L: how many
    there are), so the sum of their aux losses is ``weight`` times the mean over layers, as the official loss.
    Returns L; a model without one is an error (the weight would silently do nothing)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"the aux loss weight must be a finite number >= 0, got {weight!r}")
    blocks = [block for _, block in routed_blocks(model) if isinstance(block, DynamicCapacityMoE)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no DynamicCapacityMoE layer to set the aux loss weight on")
    for block in blocks:
        block.aux_loss_coefs[BALANCE_LOSS] = weight / len(blocks)
    return len(blocks)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _chosen_mask(ids_TK: torch.Tensor, use_TK: torch.Tensor, num_columns: int) -> torch.Tensor:
    """bool [T, num_columns]: the experts of each token's slots where ``use_TK`` (others into a spare column that
    is cut off, so a False never overwrites a True)."""
    spare_TK = torch.where(use_TK, ids_TK, num_columns)
    mask = torch.zeros(ids_TK.shape[0], num_columns + 1, dtype=torch.bool, device=ids_TK.device)
    return mask.scatter_(1, spare_TK, True)[:, :num_columns]


def _renormalise(weights_TK: torch.Tensor) -> torch.Tensor:
    return weights_TK / (weights_TK.sum(-1, keepdim=True) + RENORM_EPS)


def _check_ints(**values: tuple[int, int]) -> None:
    for name, (value, least) in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_number(name, value, low, high, *, low_open=False, high_open=False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
