"""Test helpers shared by several test modules (imported by bare name: tests/conftest.py puts tests/ on sys.path).

The per-token MoE oracle (``loop_moe`` and its pieces) is independent of the code under test: it computes
``y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` one token and one slot at a time from the raw weight tensors
with plain torch ops and activation formulas written out here, and applies capacity with its own GShard counter
(all first choices in token order, then all second choices, ...). Gradients come from autograd through the loop.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def act_formula(name: str, h: torch.Tensor) -> torch.Tensor:
    """The expert activations, from their definitions."""
    if name == "silu":
        return h * torch.sigmoid(h)
    if name == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if name == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    raise AssertionError(name)


def gshard_kept(ids: torch.Tensor, num_experts: int, capacity: int | None = None) -> list[list[bool]]:
    """Which (token, slot) pairs an expert computes: ids in ``[0, num_experts)`` and, with a capacity, within it
    in GShard's order (rank-major, then token order)."""
    num_tokens, top_k = ids.shape
    kept = [[0 <= int(ids[t, j]) < num_experts for j in range(top_k)] for t in range(num_tokens)]
    if capacity is not None:
        taken = [0] * num_experts
        for j in range(top_k):
            for t in range(num_tokens):
                if kept[t][j]:
                    e = int(ids[t, j])
                    kept[t][j] = taken[e] < capacity
                    taken[e] += kept[t][j]
    return kept


def expert_on_token(x_D, e, w_in, w_out, b_in, b_out, activation, gated):
    """Expert ``e``'s MLP on one token, from the raw [E, N, D] / [E, D, F] weights (and [E, N] / [E, D] biases
    or None); gated experts split N into the activated half and the multiplier half."""
    h = (w_in[e] * x_D[None, :]).sum(-1)  # [N]
    if b_in is not None:
        h = h + b_in[e]
    if gated:
        f = h.shape[0] // 2
        a = act_formula(activation, h[:f]) * h[f:]
    else:
        a = act_formula(activation, h)
    y = (w_out[e] * a[None, :]).sum(-1)  # [D]
    if b_out is not None:
        y = y + b_out[e]
    return y


def loop_moe(x, weights, ids, w_in, w_out, b_in=None, b_out=None, activation="silu", gated=True, capacity=None):
    """``y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` over the kept slots, one (token, slot) at a time."""
    num_tokens, out_dim = x.shape[0], w_out.shape[1]  # the output width: D, or a connector's D_out
    kept = gshard_kept(ids, w_in.shape[0], capacity)
    rows = []
    for t in range(num_tokens):
        y = torch.zeros(out_dim, dtype=x.dtype)
        for j in range(ids.shape[1]):
            if kept[t][j]:
                expert = expert_on_token(x[t], int(ids[t, j]), w_in, w_out, b_in, b_out, activation, gated)
                y = y + weights[t, j] * expert
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, out_dim)


def unimoe_audio_route_token(logits_N: torch.Tensor, p: float, tolerance: float, renorm_eps: float = 1e-6):
    """UniMoE-Audio's routing of one token over its N dynamic logits, step by step as the official code
    (``audio_dynamic_expert_selection``, then ``audio_sparse_expert_mixer`` with training off, as the shipped
    ``ignore_differentiable_router=true`` runs it): ``k = #(sorted cumulative softmax < p) + 1``; k argmax picks,
    each weighted by the softmax over the remaining logits within relative gap ``2 * tolerance`` of the pick's;
    the weights renormalised. Returns (chosen experts in pick order, their weights), differentiable."""
    probs = torch.softmax(logits_N, 0)
    k = int((probs.detach().sort(descending=True).values.cumsum(0) < p).sum()) + 1
    remaining, chosen, multipliers = list(range(logits_N.shape[0])), [], []
    for _ in range(k):
        best = max(remaining, key=lambda j: (float(logits_N[j].detach()), -j))  # argmax, first index on ties
        lead = logits_N[best]
        near = []
        for j in remaining:
            gap = (lead - logits_N[j]) / torch.maximum(logits_N[j].abs(), lead.abs())
            if not bool(gap > 2 * tolerance):  # 0/0 (NaN) is not "> threshold": a tie
                near.append(j)
        multipliers.append(torch.softmax(torch.stack([logits_N[j] for j in near]), 0)[near.index(best)])
        chosen.append(best)
        remaining.remove(best)
    weights = torch.stack(multipliers)
    return chosen, weights / (weights.sum() + renorm_eps)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random with O(1) activations: matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1^2). DiT's
    adaLN-zero init would otherwise make every prediction 0 (and every generated image constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def files_under(root: Path) -> set[Path]:
    """Every file below ``root`` (folders left out)."""
    return {p for p in root.rglob("*") if not p.is_dir()}


_GIVEN_PORTS: set[int] = set()


def rendezvous_ports(count: int) -> list[int]:
    """``count`` ports for torch.distributed rendezvous (TCPStore) servers that may run at the same time: none
    given before in this test session.

    Chosen outside the kernel's ephemeral range, where the OS hands out ports for outgoing connections (the ranks'
    store clients and gloo pairs of runs already going), so such a connection cannot take a port between this
    check and the server's bind; each is checked free by binding it, and all are held until every one is found so
    none repeats. Asking the OS for port 0 instead would give ports inside that range, and concurrent runs that
    each ask can get the same one (the failure seen on CI: EADDRINUSE at init_process_group)."""
    import random
    import socket

    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    outside = [*range(1025, low), *range(high + 1, 65536)]
    pool = outside if len(outside) >= 1000 else range(1025, 65536)  # a machine that gives all ports out
    candidates = random.Random().sample(pool, 200)
    held: list[socket.socket] = []
    try:
        for port in (p for p in candidates if p not in _GIVEN_PORTS):
            sock = socket.socket()
            try:
                sock.bind(("", port))  # all addresses, as the store server binds
            except OSError:
                sock.close()
                continue
            held.append(sock)
            if len(held) == count:
                ports = [s.getsockname()[1] for s in held]
                _GIVEN_PORTS.update(ports)
                return ports
    finally:
        for sock in held:
            sock.close()
    raise AssertionError(f"no {count} free ports outside {low}-{high}")


def random_moe(*args, seed: int = 0, **kwargs):
    """A ``MoE(*args, **kwargs)`` in eval mode with every parameter (and a choice-bias buffer) drawn N(0, 0.5^2):
    routing spread over the experts and outputs of order one."""
    from moezoo.zoo.layers import MoE

    torch.manual_seed(seed)
    moe = MoE(*args, **kwargs).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5)
        if moe.router.score_bias is not None:
            moe.router.score_bias.normal_(0.0, 0.2)
    return moe


def near_tie_dcmoe(dim: int, hidden: int, num_experts: int, seed: int = 0, **kwargs):
    """A ``DynamicCapacityMoE`` in eval mode whose gate logits spread over several experts, with gate row 1 equal to
    row 0 times 1.004: experts 0 and 1 nearly tie (relative gap 0.4% < 2%) for every token, so the near-tie weights
    matter. Experts ~ N(0, 0.4^2); ``num_null_experts`` defaults to 1."""
    from moezoo.zoo.layers import DynamicCapacityMoE

    torch.manual_seed(seed)
    kwargs.setdefault("num_null_experts", 1)
    block = DynamicCapacityMoE(dim, hidden, num_experts, **kwargs)
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 0.3)
        block.gate.weight[1] = block.gate.weight[0] * 1.004
        for weight in (block.w_in, block.w_out, block.shared_w_in, block.shared_w_out):
            if weight is not None:
                weight.normal_(0.0, 0.4)
    return block.eval()
