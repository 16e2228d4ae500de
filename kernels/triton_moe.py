"""Triton backend of the grouped expert MLP: gather + grouped GEMM + scatter kernels, forward and backward.

Design (in the spirit of vLLM's ``fused_moe`` and ScatterMoE; written from scratch for this layout):

* **Padded index space.** The dispatch plan sorts the T*k (token, slot) pairs by expert and pads every
  expert's segment up to a multiple of ``BLOCK_M`` *in index space only* (``plan.padded_rows_P``: index
  into the sorted order, -1 for padding; ``plan.block_experts_B``: the expert of each row block). From it
  we derive, per padded row, the sorted row, the token and the flat slot ``t * k + j`` (all int64, -1 for
  padding). A row block therefore belongs to exactly one expert, and activations are never padded or
  copied k times: every kernel gathers its input rows through these loaded indices.

* **``_grouped_gemm_kernel``** computes ``out[out_row(p)] = epilogue(in[in_row(p)] @ W[e(p)]^T)`` for
  every padded row p. ``W`` is addressed through explicit strides, so the same kernel also runs with a
  transposed weight (backward dX and dA). Epilogues: an optional bias, an optional fused activation
  (gated: the gate and up halves are two accumulators over the same input tile, ``act(g) * u``), an
  optional per-row scale (the router weight, read at the output row's slot) and an optional second store
  of the pre-activation ``h`` for backward. Grid: ``(num_row_blocks * cdiv(N, BLOCK_N),)``.

* **``_group_xty_kernel``** ("groupXtY") computes per expert ``out[e] = sum_{s in rows(e)} scale_s *
  A[a_row(s)]^T B[b_row(s)]``, i.e. the weight gradients ``dW_in[e] = dH^T X`` and ``dW_out[e] =
  (w dY)^T A``. It walks the expert's contiguous range of the *sorted* (unpadded) order, so experts with
  no rows simply store zeros. Grid: ``(E, cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N))``.

* **``_group_sum_kernel``** computes per expert column sums ``out[e] = sum_s scale_s * A[a_row(s)]``
  (the bias gradients). Grid: ``(E, cdiv(M, BLOCK_M))``.

* **Deterministic combine, no atomics.** GEMM2 and the dX GEMM write one row per (token, slot) into a
  zero-initialised ``[T*k, D]`` buffer (dropped slots stay zero) which torch reduces over k. Every output
  element is written by exactly one program, so results do not depend on scheduling.

* **Backward** (``_TritonExpertMLP``): with ``o`` the unweighted expert output and ``w`` the router weight,
  ``G = dY_tok @ W_out[e]`` (grouped GEMM, transposed weight) gives both the router gradient
  ``dw = <G, a> + <dY_t, b_out[e]>`` and ``dA = w G``; the activation backward is a torch elementwise step on
  the saved pre-activation ``h``; then ``dX`` (grouped GEMM with ``W_in`` transposed, scattered per slot),
  ``dW_in``/``dW_out`` (groupXtY) and ``db_in``/``db_out`` (group sums).

Kernel rules (see the project's kernel notes): fp32 accumulation, int64 pointer arithmetic, block sizes
>= 16 for ``tl.dot``, masks for ragged D / F, no libdevice externs (``tanh`` is written through
``sigmoid``). Under ``TRITON_INTERPRET=1`` a single small config is used; test fp32 and fp16 there (the
interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .activations import activation_fn, activation_grad
from .plan import DispatchPlan, pad_to_blocks

__all__ = ["triton_expert_mlp"]

# Activation codes shared by the host and the kernels (constexpr ints select the epilogue at compile time).
_ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
_NO_ACTIVATION = -1


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _apply_activation(z, ACTIVATION: tl.constexpr):
    """The nonlinearity on an fp32 tile; ``tanh(u) = 2 sigmoid(2u) - 1`` avoids a libdevice extern."""
    if ACTIVATION == 0:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 1:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 2:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACTIVATION == 3:
        z = tl.maximum(z, 0.0)
    return z


@triton.jit
def _grouped_gemm_kernel(
    in_ptr, in_rows_ptr,  # input [*, K] and the input row of every padded row (-1 = padding)
    out_ptr, out_rows_ptr,  # output [*, N] and the output row of every padded row (-1 = padding)
    w_ptr, block_experts_ptr,  # weight addressed as W[e, n, k] through strides; expert of each row block
    bias_ptr, scale_ptr, h_ptr,  # optional: bias [E, N_in], per-output-row scale, pre-activation store
    N, K,
    stride_in_m, stride_in_k,
    stride_out_m, stride_out_n,
    stride_w_e, stride_w_n, stride_w_k,
    stride_b_e, stride_b_n,
    stride_h_m, stride_h_n,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_H: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    block_m = pid // num_n_blocks
    block_n = pid % num_n_blocks

    # int64 from here on: row indices times strides overflow int32 at large T*k*D.
    offs_m = block_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    expert = tl.load(block_experts_ptr + block_m).to(tl.int64)

    in_rows = tl.load(in_rows_ptr + offs_m)
    row_ok = in_rows >= 0
    in_rows = tl.where(row_ok, in_rows, 0)  # padding rows point at row 0 but are masked off
    n_ok = offs_n < N

    in_tile_ptrs = in_ptr + in_rows[:, None] * stride_in_m + offs_k[None, :] * stride_in_k
    # The weight tile is read as W[e, n, k]^T -> [BLOCK_K, BLOCK_N].
    w_tile_ptrs = w_ptr + expert * stride_w_e + offs_k[:, None] * stride_w_k + offs_n[None, :] * stride_w_n
    up_shift = N * stride_w_n  # gated: the up rows follow the N gate rows

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (offs_k + k0) < K
        x_tile = tl.load(in_tile_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w_tile = tl.load(w_tile_ptrs, mask=w_mask, other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        if GATED:
            w_up_tile = tl.load(w_tile_ptrs + up_shift, mask=w_mask, other=0.0)
            acc_up = tl.dot(x_tile, w_up_tile, acc_up, input_precision=INPUT_PRECISION)
        in_tile_ptrs += BLOCK_K * stride_in_k
        w_tile_ptrs += BLOCK_K * stride_w_k

    if HAS_BIAS:
        bias_ptrs = bias_ptr + expert * stride_b_e + offs_n * stride_b_n
        acc += tl.load(bias_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptrs + N * stride_b_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    out_rows = tl.load(out_rows_ptr + offs_m)
    out_ok = out_rows >= 0
    out_rows = tl.where(out_ok, out_rows, 0)
    store_mask = out_ok[:, None] & n_ok[None, :]

    if STORE_H:  # the pre-activation, kept for backward (both halves when gated)
        h_ptrs = h_ptr + out_rows[:, None] * stride_h_m + offs_n[None, :] * stride_h_n
        tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=store_mask)
        if GATED:
            tl.store(h_ptrs + N * stride_h_n, acc_up.to(h_ptr.dtype.element_ty), mask=store_mask)

    if ACTIVATION >= 0:
        acc = _apply_activation(acc, ACTIVATION)
        if GATED:
            acc = acc * acc_up
    if HAS_SCALE:  # the router weight of the output row's (token, slot)
        scale = tl.load(scale_ptr + out_rows, mask=out_ok, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]

    out_ptrs = out_ptr + out_rows[:, None] * stride_out_m + offs_n[None, :] * stride_out_n
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _group_xty_kernel(
    a_ptr, a_rows_ptr,  # A [*, M], read at a_rows[s] (or at s when A_GATHER is off)
    b_ptr, b_rows_ptr,  # B [*, N], read at b_rows[s] (or at s)
    scale_ptr, scale_rows_ptr,  # optional per-row scale, read at scale_rows[s]
    out_ptr, offsets_ptr,  # out [E, M, N]; expert e owns sorted rows offsets[e]:offsets[e + 1]
    M, N,
    stride_a_s, stride_a_m,
    stride_b_s, stride_b_n,
    stride_o_e, stride_o_m, stride_o_n,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_n_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_n_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):  # an expert with no rows runs no iterations and stores zeros
        offs_s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        s_ok = offs_s < end
        safe_s = tl.where(s_ok, offs_s, 0)
        a_rows = safe_s
        if A_GATHER:
            a_rows = tl.load(a_rows_ptr + safe_s, mask=s_ok, other=0)
        b_rows = safe_s
        if B_GATHER:
            b_rows = tl.load(b_rows_ptr + safe_s, mask=s_ok, other=0)
        # A^T tile [BLOCK_M, BLOCK_S] read directly in transposed order.
        a_t = tl.load(
            a_ptr + a_rows[None, :] * stride_a_s + offs_m[:, None] * stride_a_m,
            mask=m_ok[:, None] & s_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_b_s + offs_n[None, :] * stride_b_n,
            mask=s_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if HAS_SCALE:
            scale_rows = tl.load(scale_rows_ptr + safe_s, mask=s_ok, other=0)
            scale = tl.load(scale_ptr + scale_rows, mask=s_ok, other=0.0).to(tl.float32)
            a_t = (a_t.to(tl.float32) * scale[None, :]).to(b.dtype)
        acc = tl.dot(a_t, b, acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + expert * stride_o_e + offs_m[:, None] * stride_o_m + offs_n[None, :] * stride_o_n
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _group_sum_kernel(
    a_ptr, a_rows_ptr, scale_ptr, scale_rows_ptr, out_ptr, offsets_ptr,
    M,
    stride_a_s, stride_a_m, stride_o_e, stride_o_m,
    A_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)

    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        s_ok = offs_s < end
        safe_s = tl.where(s_ok, offs_s, 0)
        a_rows = safe_s
        if A_GATHER:
            a_rows = tl.load(a_rows_ptr + safe_s, mask=s_ok, other=0)
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_a_s + offs_m[None, :] * stride_a_m,
            mask=s_ok[:, None] & m_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_SCALE:
            scale_rows = tl.load(scale_rows_ptr + safe_s, mask=s_ok, other=0)
            a = a * tl.load(scale_ptr + scale_rows, mask=s_ok, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(a, axis=0)

    tl.store(out_ptr + expert * stride_o_e + offs_m * stride_o_m, acc.to(out_ptr.dtype.element_ty), mask=m_ok)


# ------------------------------------------------------------------------------------------ host helpers


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config() -> dict:
    """One fixed config: small under the CPU interpreter (cost is per program element), larger on GPU."""
    if _interpreted():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)


def _input_precision(dtype: torch.dtype) -> str | None:
    """Match torch's fp32 matmul precision (TF32 only if the user allowed it); None = Triton's default,
    which is what 16-bit inputs use on every backend."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return None


class _Layout:
    """Per-row index arrays derived from a plan, shared by forward and backward.

    Padded rows (length P, -1 = padding) drive the grouped GEMMs; sorted rows (length S) drive the
    per-expert reductions.
    """

    def __init__(self, plan: DispatchPlan, block_m: int):
        if plan.block_size == block_m and plan.padded_rows_P is not None:
            padded_rows_P, block_experts_B = plan.padded_rows_P, plan.block_experts_B
        else:  # built for another block size (or not at all): redo the cheap index padding for ours
            padded_rows_P, block_experts_B = pad_to_blocks(plan.counts_E, plan.offsets_E1, block_m)
        self.block_m = block_m
        self.num_blocks = int(block_experts_B.numel())
        self.block_experts_B = block_experts_B.contiguous()
        is_row_P = padded_rows_P >= 0
        safe_P = padded_rows_P.clamp(min=0)
        self.sorted_P = padded_rows_P.contiguous()
        self.tokens_P = torch.where(is_row_P, plan.sorted_tokens_S[safe_P], -1)
        self.slots_P = torch.where(is_row_P, plan.sorted_slots_S[safe_P], -1)
        self.tokens_S = plan.sorted_tokens_S.contiguous()
        self.slots_S = plan.sorted_slots_S.contiguous()
        self.offsets_E1 = plan.offsets_E1.contiguous()
        self.num_experts = plan.num_experts
        self.num_rows = plan.num_dispatched


def _pick_block_m(plan: DispatchPlan) -> int:
    """Use the plan's block size when a kernel can (a power of two >= 16), else the default config."""
    size = plan.block_size
    if size is not None and size >= 16 and size & (size - 1) == 0:
        return size
    return _config()["BLOCK_M"]


def _grouped_gemm(
    layout: _Layout,
    in_MK: torch.Tensor,
    in_rows_P: torch.Tensor,
    out: torch.Tensor,
    out_rows_P: torch.Tensor,
    w_strides: tuple[int, int, int],
    w: torch.Tensor,
    n_out: int,
    k_in: int,
    *,
    bias_EN: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    activation: int = _NO_ACTIVATION,
    gated: bool = False,
) -> None:
    """Launch ``_grouped_gemm_kernel``: ``out[out_rows] = epilogue(in[in_rows] @ W[e]^T)`` with ``W[e]`` as
    ``[n_out, k_in]`` through ``w_strides`` = (expert, n, k) strides."""
    if layout.num_blocks == 0 or n_out == 0:
        return
    cfg = _config()
    grid = (layout.num_blocks * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _grouped_gemm_kernel[grid](
        in_MK, in_rows_P, out, out_rows_P, w, layout.block_experts_B,
        bias_EN, scale, h_out,
        n_out, k_in,
        in_MK.stride(0), in_MK.stride(1),
        out.stride(0), out.stride(1),
        *w_strides,
        *(bias_EN.stride() if bias_EN is not None else (0, 0)),
        *(h_out.stride() if h_out is not None else (0, 0)),
        HAS_BIAS=bias_EN is not None, HAS_SCALE=scale is not None, STORE_H=h_out is not None,
        ACTIVATION=activation, GATED=gated,
        INPUT_PRECISION=_input_precision(in_MK.dtype),
        BLOCK_M=layout.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
    )


def _group_xty(
    layout: _Layout,
    a_SM: torch.Tensor,
    a_rows_S: torch.Tensor | None,
    b_SN: torch.Tensor,
    b_rows_S: torch.Tensor | None,
    out_EMN: torch.Tensor,
    scale: torch.Tensor | None = None,
    scale_rows_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``_group_xty_kernel``: ``out[e] = sum_{s of e} scale_s A[a_row(s)]^T B[b_row(s)]``; rows
    index the sorted order unless a gather index is given. Writes every expert (zeros when empty)."""
    num_m, num_n = out_EMN.shape[1], out_EMN.shape[2]
    if out_EMN.numel() == 0:
        return out_EMN
    cfg = _config()
    block = 32  # M/N tile of the weight gradient; >= 16 for tl.dot
    grid = (layout.num_experts, triton.cdiv(num_m, block) * triton.cdiv(num_n, block))
    _group_xty_kernel[grid](
        a_SM, a_rows_S, b_SN, b_rows_S, scale, scale_rows_S, out_EMN, layout.offsets_E1,
        num_m, num_n,
        a_SM.stride(0), a_SM.stride(1),
        b_SN.stride(0), b_SN.stride(1),
        out_EMN.stride(0), out_EMN.stride(1), out_EMN.stride(2),
        A_GATHER=a_rows_S is not None, B_GATHER=b_rows_S is not None, HAS_SCALE=scale is not None,
        INPUT_PRECISION=_input_precision(a_SM.dtype),
        BLOCK_M=block, BLOCK_N=block, BLOCK_S=cfg["BLOCK_K"],
    )
    return out_EMN


def _group_sum(
    layout: _Layout,
    a_SM: torch.Tensor,
    a_rows_S: torch.Tensor | None,
    out_EM: torch.Tensor,
    scale: torch.Tensor | None = None,
    scale_rows_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``_group_sum_kernel``: ``out[e] = sum_{s of e} scale_s A[a_row(s)]`` (bias gradients)."""
    num_m = out_EM.shape[1]
    if out_EM.numel() == 0:
        return out_EM
    cfg = _config()
    block = 32
    grid = (layout.num_experts, triton.cdiv(num_m, block))
    _group_sum_kernel[grid](
        a_SM, a_rows_S, scale, scale_rows_S, out_EM, layout.offsets_E1,
        num_m,
        a_SM.stride(0), a_SM.stride(1), out_EM.stride(0), out_EM.stride(1),
        A_GATHER=a_rows_S is not None, HAS_SCALE=scale is not None,
        BLOCK_M=block, BLOCK_S=cfg["BLOCK_K"],
    )
    return out_EM


def _reduce_slots(slots_TKD: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum the k per-slot rows of each token in a fixed order (fp32 accumulation), no atomics."""
    # Explicit sizes: a -1 cannot be inferred when T = 0.
    return slots_TKD.view(num_tokens, top_k, slots_TKD.shape[1]).sum(1, dtype=torch.float32).to(dtype)


def _hidden_size(w_in_ENK: torch.Tensor, gated: bool) -> int:
    return w_in_ENK.shape[1] // 2 if gated else w_in_ENK.shape[1]


# ------------------------------------------------------------------------------------ forward / backward


def _forward(x_TD, weights_flat, plan, layout, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated, keep_h):
    """GEMM1 (gather x, fused bias + activation) into sorted rows, GEMM2 (bias, router weight) into slot
    rows, then the k-reduction. Returns ``y_TD`` and, if ``keep_h``, the pre-activation ``h_SN``."""
    num_tokens, dim = x_TD.shape
    n_in, out_dim = w_in_ENK.shape[1], w_out_EDF.shape[1]
    hidden = _hidden_size(w_in_ENK, gated)
    rows = layout.num_rows

    a_SF = x_TD.new_empty(rows, hidden)
    h_SN = x_TD.new_empty(rows, n_in) if keep_h else None
    _grouped_gemm(
        layout, x_TD, layout.tokens_P, a_SF, layout.sorted_P,
        (w_in_ENK.stride(0), w_in_ENK.stride(1), w_in_ENK.stride(2)), w_in_ENK, hidden, dim,
        bias_EN=b_in_EN, h_out=h_SN, activation=_ACTIVATION_CODES[activation], gated=gated,
    )
    # Dropped slots are never written, so they stay zero and add nothing in the reduction.
    slots_TKD = x_TD.new_zeros(num_tokens * plan.top_k, out_dim)
    _grouped_gemm(
        layout, a_SF, layout.sorted_P, slots_TKD, layout.slots_P,
        (w_out_EDF.stride(0), w_out_EDF.stride(1), w_out_EDF.stride(2)), w_out_EDF, out_dim, hidden,
        bias_EN=b_out_ED, scale=weights_flat,
    )
    return _reduce_slots(slots_TKD, num_tokens, plan.top_k, x_TD.dtype), h_SN


def _recompute_activation(h_SN: torch.Tensor, activation: str, gated: bool):
    """``a = act(gate) * up`` (or ``act(h)``) from the saved pre-activation; also returns ``act(gate)``."""
    act = activation_fn(activation)
    if gated:
        gate_SF, up_SF = h_SN.chunk(2, dim=-1)
        act_gate_SF = act(gate_SF)
        return act_gate_SF * up_SF, act_gate_SF
    act_SF = act(h_SN)
    return act_SF, act_SF


class _TritonExpertMLP(torch.autograd.Function):
    """Forward saves only the pre-activation ``h`` [S, N_in]; backward recomputes ``a`` elementwise."""

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, plan, layout, activation, gated):
        weights_flat = weights_TK.reshape(-1).contiguous()
        y_TD, h_SN = _forward(
            x_TD, weights_flat, plan, layout, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated, True
        )
        ctx.save_for_backward(x_TD, weights_flat, h_SN, w_in_ENK, w_out_EDF, b_out_ED)
        ctx.plan, ctx.layout, ctx.activation, ctx.gated = plan, layout, activation, gated
        ctx.b_in_dtype = None if b_in_EN is None else b_in_EN.dtype
        ctx.weights_dtype = weights_TK.dtype
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_TD, weights_flat, h_SN, w_in_ENK, w_out_EDF, b_out_ED = ctx.saved_tensors
        plan, layout, gated = ctx.plan, ctx.layout, ctx.gated
        need_x, need_w, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
        grad_y_TD = grad_y_TD.contiguous().to(x_TD.dtype)
        num_tokens, dim = x_TD.shape
        hidden, n_in, out_dim = _hidden_size(w_in_ENK, gated), w_in_ENK.shape[1], w_out_EDF.shape[1]
        tokens_S, slots_S = layout.tokens_S, layout.slots_S

        # G = dY[token] @ W_out[e]: the gradient at the (unweighted) hidden activation, in sorted rows.
        g_SF = x_TD.new_empty(layout.num_rows, hidden)
        _grouped_gemm(
            layout, grad_y_TD, layout.tokens_P, g_SF, layout.sorted_P,
            (w_out_EDF.stride(0), w_out_EDF.stride(2), w_out_EDF.stride(1)), w_out_EDF, hidden, out_dim,
        )
        a_SF, act_gate_SF = _recompute_activation(h_SN, ctx.activation, gated)
        w_S = weights_flat.index_select(0, slots_S).to(torch.float32)

        grad_weights = None
        if need_w:
            # d w_tj = <dY_t, o_tj> = <G, a> + <dY_t, b_out[e]>; the bias term via one small [T, E] GEMM.
            grad_w_S = (g_SF.float() * a_SF.float()).sum(-1)
            if b_out_ED is not None:
                dyb_TE = grad_y_TD.float() @ b_out_ED.float().t()
                experts_S = plan.ids_TK.reshape(-1).index_select(0, slots_S)
                grad_w_S = grad_w_S + dyb_TE[tokens_S, experts_S]
            grad_flat = torch.zeros(num_tokens * plan.top_k, dtype=torch.float32, device=x_TD.device)
            grad_flat[slots_S] = grad_w_S  # slots are unique: a plain, deterministic scatter
            grad_weights = grad_flat.view(num_tokens, plan.top_k).to(ctx.weights_dtype)

        grad_w_out = grad_b_out = None
        if need_w_out:  # dW_out[e] = sum_s w_s dY[token_s]^T a_s
            grad_w_out = _group_xty(
                layout, grad_y_TD, tokens_S, a_SF.to(x_TD.dtype).contiguous(), None,
                torch.empty_like(w_out_EDF), scale=weights_flat, scale_rows_S=slots_S,
            )
        if need_b_out:
            grad_b_out = _group_sum(
                layout, grad_y_TD, tokens_S, torch.empty_like(b_out_ED), scale=weights_flat, scale_rows_S=slots_S
            )

        grad_x = grad_w_in = grad_b_in = None
        if need_x or need_w_in or need_b_in:
            grad_a_SF = g_SF * w_S[:, None].to(g_SF.dtype)
            if gated:
                gate_SF, up_SF = h_SN[:, :hidden], h_SN[:, hidden:]
                grad_h_SN = torch.cat(
                    [activation_grad(ctx.activation, grad_a_SF * up_SF, gate_SF), grad_a_SF * act_gate_SF], dim=1
                )
            else:
                grad_h_SN = activation_grad(ctx.activation, grad_a_SF, h_SN)
            grad_h_SN = grad_h_SN.contiguous()
            if need_x:  # dX slot rows = dH @ W_in[e] (W_in read transposed), reduced over k
                slots_TKD = x_TD.new_zeros(num_tokens * plan.top_k, dim)
                _grouped_gemm(
                    layout, grad_h_SN, layout.sorted_P, slots_TKD, layout.slots_P,
                    (w_in_ENK.stride(0), w_in_ENK.stride(2), w_in_ENK.stride(1)), w_in_ENK, dim, n_in,
                )
                grad_x = _reduce_slots(slots_TKD, num_tokens, plan.top_k, x_TD.dtype)
            if need_w_in:  # dW_in[e] = sum_s dH_s^T x[token_s]
                grad_w_in = _group_xty(layout, grad_h_SN, None, x_TD, tokens_S, torch.empty_like(w_in_ENK))
            if need_b_in:
                grad_b_in_EN = w_in_ENK.new_empty(w_in_ENK.shape[:2], dtype=ctx.b_in_dtype)
                grad_b_in = _group_sum(layout, grad_h_SN, None, grad_b_in_EN)

        return grad_x, grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None, None, None


# ------------------------------------------------------------------------------------------------ entry


def triton_expert_mlp(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    plan: DispatchPlan,
    w_in_ENK: torch.Tensor,
    w_out_EDF: torch.Tensor,
    b_in_EN: torch.Tensor | None = None,
    b_out_ED: torch.Tensor | None = None,
    activation: str = "silu",
    gated: bool = True,
) -> torch.Tensor:
    """``y[t] = sum_{kept j} weights_TK[t, j] * expert_{ids[t, j]}(x[t])`` with the Triton kernels.

    Differentiable w.r.t. ``x_TD``, ``weights_TK``, the expert weights and the biases. ``x_TD`` and the
    expert weights must share a floating dtype (fp32 / fp16; bf16 on GPU only). Shape checks are the
    caller's (``moezoo.kernels.experts.expert_mlp``).
    """
    if activation not in _ACTIVATION_CODES:
        raise ValueError(f"unknown activation {activation!r}; accepted: {', '.join(_ACTIVATION_CODES)}")
    if w_in_ENK.dtype != x_TD.dtype or w_out_EDF.dtype != x_TD.dtype:
        raise TypeError(
            f"the Triton backend needs x and the expert weights in one dtype, got x {x_TD.dtype}, "
            f"w_in {w_in_ENK.dtype}, w_out {w_out_EDF.dtype}"
        )
    layout = _Layout(plan, _pick_block_m(plan))
    tensors = (x_TD, weights_TK, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _TritonExpertMLP.apply(*tensors, plan, layout, activation, gated)
    weights_flat = weights_TK.reshape(-1).contiguous()
    y_TD, _ = _forward(x_TD, weights_flat, plan, layout, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated, False)
    return y_TD
