"""MoH: Mixture-of-Head attention (Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head
Attention", arXiv 2410.11842; SkyworkAI/MoH, ``MoH-DiT/models.py``).

Multi-head attention is a sum over heads, ``proj(concat_h o_h) = sum_h W_o^h o_h``; MoH treats the heads as
experts and replaces the plain sum by a weighted one in which each token uses only some heads:

- the first ``num_shared_heads`` heads are *shared*: every token uses them, weighted by
  ``g_s = h_s * softmax(W_s x)`` over the shared heads (exactly 1 when there is a single shared head);
- the other ``H - h_s`` heads are *routed*: ``p = softmax(W_r x)`` over them, each token keeps its top
  ``k`` heads, their scores are renormalised to sum 1 and multiplied by ``k`` (so an all-equal router gives
  every chosen head weight 1, as in plain attention); unchosen heads get 0;
- the two-stage routing mixes the two kinds per token: ``[b_s, b_r] = 2 * softmax(W_0 x)`` multiplies the
  shared and the routed weights (only when both kinds exist).

Head ``h``'s output ``o_h`` (ordinary scaled dot-product attention of that head) is multiplied by its
token's weight before the output projection. The routers read the attention block's input ``x``.
Balance loss (the official code's, per layer): ``E^2 * mean_i(P_i * f_i)`` with ``E = H - h_s`` routed heads,
``P_i`` the mean router probability of head i and ``f_i`` the fraction of tokens that chose it (the
``"head_balance"`` aux loss; its coefficient, 0.01 in the paper, is ``aux_loss_coef``). The official training
averages it over the MoH layers: a model of L layers gives each ``aux_loss_coef = 0.01 / L``, so the sum that
``total_aux_loss`` takes is that average.

What we chose:

- the equations above are the official code's (the paper writes the same two-stage score); parameter names
  are ours: ``shared_router`` (official ``wg_1``), ``routed_router`` (``wg``), ``mix_router`` (``wg_0``);
- every head is computed densely and the weights (0 for unchosen heads) applied afterwards, as the official
  code does: identical numbers, no speed-up on CPU (a kernel would skip the (token, head) pairs with weight 0);
- it is a :class:`~moezoo.zoo.layers.routed.RoutedBlock` whose "experts" are the routed heads (routed head
  ``i`` is head ``num_shared_heads + i``), so the same tools record, sum and draw MoE and MoH routing; the aux
  loss is computed in every forward (the official code only in training).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.kernels.routing import RouterOutput

from .routed import RoutedBlock


class MoHAttention(RoutedBlock):
    """Self-attention whose heads are shared or routed experts: ``forward(x [B, N, dim]) -> [B, N, dim]``.

    Args:
        dim: model width; ``dim % num_heads == 0``.
        num_heads: all heads H (shared + routed).
        num_shared_heads: heads every token uses (the first ``num_shared_heads`` heads).
        top_k_heads: routed heads each token uses, out of ``num_heads - num_shared_heads`` (0: none).
        qkv_bias: bias in the qkv map (the output projection always has one, as timm's Attention).
        qk_norm: LayerNorm over each head's queries and keys (eps 1e-6).
        aux_loss_coef: the weight of the head balance loss in ``routing.aux_loss``.

    Its routed experts are the ``num_heads - num_shared_heads`` routed heads (``num_experts``), ``top_k_heads``
    per token; with ``top_k_heads=0`` it routes nothing (no experts, ``routing`` stays None).

    Parameters are named like timm's ``Attention`` (``qkv [3*dim, dim]`` with rows q, k, v and heads
    contiguous inside each, ``proj``), plus the routers ``shared_router``, ``routed_router``, ``mix_router``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_shared_heads: int,
        top_k_heads: int,
        qkv_bias: bool = True,
        *,
        qk_norm: bool = False,
        aux_loss_coef: float = 0.01,
    ):
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        num_routed = num_heads - num_shared_heads
        if not 0 <= num_shared_heads <= num_heads:
            raise ValueError(f"num_shared_heads must be in [0, {num_heads}], got {num_shared_heads}")
        if not 0 <= top_k_heads <= num_routed:
            raise ValueError(f"top_k_heads must be in [0, {num_routed}] (the routed heads), got {top_k_heads}")
        if num_shared_heads == 0 and top_k_heads == 0:
            raise ValueError("MoHAttention needs at least one shared head or top_k_heads >= 1")
        super().__init__(num_routed if top_k_heads else 0, top_k_heads, aux_loss_coefs={"head_balance": aux_loss_coef},
                         expert_names=[f"head {num_shared_heads + i}" for i in range(num_routed if top_k_heads else 0)])
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_shared_heads, self.num_routed_heads, self.top_k_heads = num_shared_heads, num_routed, top_k_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        routed = top_k_heads > 0
        # A single shared head's softmax weight is 1: no router needed.
        self.shared_router = nn.Linear(dim, num_shared_heads, bias=False) if num_shared_heads > 1 else None
        self.routed_router = nn.Linear(dim, num_routed, bias=False) if routed else None
        self.mix_router = nn.Linear(dim, 2, bias=False) if routed and num_shared_heads else None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, shared={self.num_shared_heads}, "
            f"routed={self.num_routed_heads}, top_k={self.top_k_heads}"
        )

    def head_weights(self, x_TD: torch.Tensor, tokens_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """The per-token head weights ``[T, H]`` (0 for unchosen routed heads); records ``self.routing`` for
        tokens of leading shape ``tokens_shape``."""
        num_tokens = x_TD.shape[0]
        shared_TS = x_TD.new_ones(num_tokens, self.num_shared_heads)
        if self.shared_router is not None:
            shared_TS = self.shared_router(x_TD).softmax(-1) * self.num_shared_heads
        if self.routed_router is None:
            self.routing = None
            return shared_TS
        k = self.top_k_heads
        logits_TR = self.routed_router(x_TD)
        probs_TR = logits_TR.softmax(-1)
        top_TK, ids_TK = probs_TR.topk(k, dim=-1)
        top_TK = top_TK / top_TK.sum(-1, keepdim=True).clamp(min=torch.finfo(top_TK.dtype).eps) * k
        routed_TR = torch.zeros_like(probs_TR).scatter(1, ids_TK, top_TK)
        if self.mix_router is not None:
            mix_T2 = self.mix_router(x_TD).softmax(-1) * 2
            shared_TS = shared_TS * mix_T2[:, :1]
            routed_TR = routed_TR * mix_T2[:, 1:]
        self.record_routing(RouterOutput(ids_TK, routed_TR.gather(1, ids_TK), probs_TR, logits_TR), tokens_shape)
        return torch.cat([shared_TS, routed_TR], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        weights_BNH = self.head_weights(x.reshape(B * N, D), (B, N)).reshape(B, N, self.num_heads, 1).to(x.dtype)
        q_BHND, k_BHND, v_BHND = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o_BHND = F.scaled_dot_product_attention(self.q_norm(q_BHND), self.k_norm(k_BHND), v_BHND)
        o_BNHd = o_BHND.transpose(1, 2) * weights_BNH
        return self.proj(o_BNHd.reshape(B, N, D))
