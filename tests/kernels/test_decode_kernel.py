"""The MoE block's native decode kernel (moezoo.kernels.cpu_decode) against independent references.

- the block at 1-16 tokens (and up to the kernel's limit when allowed) against the block computed token by token
  from its raw parameters with the routing formulas written out (softmax / sigmoid scores, choice bias, router
  bias, renormalisation, scaling; SwiGLU, GeGLU, plain and ReLU experts; shared MLP or none; odd widths);
- the routing record it leaves: ids, weights, scores and logits by the formulas, and the lazy load and losses;
- when the block must not take it (autograd, training, other dtypes, masks, dropping capacity, biases, special
  experts, a shared gate) and that the eager path then runs; a non-finite logit still raises the router's error;
- weights changed in place, replaced, or given another dtype;
- the build: cached per source and CPU, atomic, and a missing compiler falls back with a warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import act_formula, expert_on_token, near_tie_dcmoe, random_moe, unimoe_audio_route_token
from tolerance import fp_tolerance

import moezoo.kernels.cpu_decode as cpu_decode
from moezoo.zoo.layers import DynamicCapacityMoE, MoE
from moezoo.zoo.layers.modality import IntraInterMoE

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="no C compiler: the kernel cannot be built")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the C function."""
    calls = {"n": 0}
    for kind in (cpu_decode.PreparedLayer, cpu_decode.PreparedDynamicLayer):
        def counting(self, x, original=kind.run):
            calls["n"] += 1
            return original(self, x)

        monkeypatch.setattr(kind, "run", counting)
    return calls


def route_by_formula(moe: MoE, x_TD: torch.Tensor):
    """(ids, weights, scores, logits) of topk_route's definition, written out with float64 scores."""
    r = moe.router
    logits = x_TD.double() @ r.weight.detach().double().t()
    if r.bias is not None:
        logits = logits + r.bias.detach().double()
    scores = torch.sigmoid(logits) if r.kind == "sigmoid" else logits.softmax(-1)
    choice = scores if r.score_bias is None else scores + r.score_bias.double()
    ids = torch.stack([c.argsort(descending=True, stable=True)[:moe.top_k] for c in choice])
    weights = scores.gather(1, ids)
    if r.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * r.routed_scaling, scores, logits


def block_token_by_token(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The block's output in float64, one token and one expert at a time."""
    ids, weights, _, _ = route_by_formula(moe, x_TD)
    w_in, w_out, H = moe.w_in.detach().double(), moe.w_out.detach().double(), moe.hidden_dim
    rows = []
    for t, x in enumerate(x_TD.double()):
        y = torch.zeros_like(x)
        for j in range(moe.top_k):
            h = w_in[int(ids[t, j])] @ x
            a = act_formula(moe.activation, h[:H]) * h[H:] if moe.gated else act_formula(moe.activation, h)
            y = y + weights[t, j] * (w_out[int(ids[t, j])] @ a)
        if moe.shared is not None:
            s = moe.shared
            up = s.up_proj.weight.detach().double() @ x
            a = act_formula(moe.activation, s.gate_proj.weight.detach().double() @ x) * up if s.gated \
                else act_formula(moe.activation, up)
            y = y + s.down_proj.weight.detach().double() @ a
        rows.append(y)
    return torch.stack(rows)


CONFIGS = {
    "DiT-MoE (softmax top-2, shared)": dict(num_shared_experts=1, shared_hidden_dim=24),
    "Mixtral (renormalised, no shared)": dict(renormalize=True),
    "DeepSeek-V3-like (sigmoid, choice bias, scaling, router bias)": dict(
        router="sigmoid", score_bias=True, renormalize=True, routed_scaling=2.5, router_bias=True,
        num_shared_experts=2),
    "GeGLU experts": dict(expert="geglu", num_shared_experts=1),
    "plain MLP experts and shared": dict(expert="mlp", num_shared_experts=1, shared_hidden_dim=20),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "relu": dict(activation="relu", num_shared_experts=1),
}


@pytest.mark.parametrize("T", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_block_matches_the_block_token_by_token(kernel_calls, config, T):
    D, H = 19, 13  # odd widths: the kernel's 4-row blocks and vector loops have remainders
    moe = random_moe(D, H, 7, 3 if T == 3 else 2, **CONFIGS[config])
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        y = moe(x)
    assert kernel_calls["n"] == 1
    reduction = max(D, H, moe.shared.up_proj.out_features if moe.shared is not None else 0)
    tol = fp_tolerance(torch.float32, reduction, layers=3, scale=float(y.abs().max()))
    torch.testing.assert_close(y.double(), block_token_by_token(moe, x), **tol)


def test_up_to_the_kernels_token_limit(kernel_calls, monkeypatch):
    monkeypatch.setattr(cpu_decode, "MAX_SLOTS", 1 << 10)
    moe = random_moe(24, 16, 8, 2, num_shared_experts=1)
    x = torch.randn(cpu_decode.MAX_TOKENS, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = moe(x)
        assert kernel_calls["n"] == 1
        torch.testing.assert_close(y.double(), block_token_by_token(moe, x),
                                   **fp_tolerance(torch.float32, 24, layers=3, scale=float(y.abs().max())))
        moe(torch.randn(cpu_decode.MAX_TOKENS + 1, 24))  # one more token: the eager path
    assert kernel_calls["n"] == 1
    prepared = moe._decode_prepared["softmax"][2]  # (tensors, state, prepared layer)
    with pytest.raises(ValueError, match=f"at most {cpu_decode.MAX_TOKENS} tokens"):
        prepared(torch.randn(cpu_decode.MAX_TOKENS + 1, 24))
    with pytest.raises(ValueError, match="contiguous fp32 CPU tokens of width 24"):
        prepared(torch.randn(2, 24, dtype=torch.float64))


@pytest.mark.parametrize("config", ["DiT-MoE (softmax top-2, shared)",
                                    "DeepSeek-V3-like (sigmoid, choice bias, scaling, router bias)"])
def test_routing_record_is_the_routers(kernel_calls, config):
    moe = random_moe(16, 8, 6, 2, **CONFIGS[config], aux_loss_coefs={"load_balance": 0.01, "z_loss": 0.001})
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moe(x)
    assert kernel_calls["n"] == 1
    record = moe.routing
    ids, weights, scores, _ = route_by_formula(moe, x)
    tol = fp_tolerance(torch.float32, 16, layers=2)
    assert torch.equal(record.ids_TK, ids)
    torch.testing.assert_close(record.weights_TK.double(), weights, **tol)
    torch.testing.assert_close(record.probs_TE.double(), scores, **tol)
    assert record.load_E.tolist() == torch.bincount(ids.flatten(), minlength=6).float().tolist()
    assert record.dropped == 0
    # the same record as the eager path's: counts and aux losses read lazily from the kernel's tensors
    eager = random_moe(16, 8, 6, 2, **CONFIGS[config], aux_loss_coefs={"load_balance": 0.01, "z_loss": 0.001})
    eager.backend = "reference"
    with torch.no_grad():
        eager(x)
    for name in ("load_balance", "z_loss"):
        torch.testing.assert_close(record.aux_terms[name], eager.routing.aux_terms[name], **tol)


@pytest.mark.parametrize("case", ["autograd", "training", "bfloat16", "mask", "dropping capacity", "biases",
                                  "null experts", "shared gate", "reference backend", "too many tokens", "ternary"])
def test_the_eager_path_where_the_kernel_does_not_apply(kernel_calls, case):
    kwargs = dict(num_shared_experts=1)
    kwargs.update({"dropping capacity": dict(capacity_factor=0.5), "biases": dict(bias=True),
                   "null experts": dict(num_null_experts=1), "shared gate": dict(num_shared_experts=1, shared_gate=True),
                   "ternary": dict(expert="ternary")}.get(case, {}))
    moe = random_moe(16, 8, 6, 2, **kwargs)
    tokens = cpu_decode.MAX_SLOTS // 2 + 1 if case == "too many tokens" else 4  # top-2: one slot over
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(0))
    allowed = None
    if case == "training":
        moe.train()
    if case == "bfloat16":
        moe, x = moe.to(torch.bfloat16), x.to(torch.bfloat16)
    if case == "mask":
        allowed = torch.ones(tokens, 6, dtype=torch.bool)
    if case == "reference backend":
        moe.backend = "reference"
    if case == "autograd":
        y = moe(x)
        assert y.requires_grad
    else:
        with torch.no_grad():
            moe(x, allowed)
    assert kernel_calls["n"] == 0


def test_a_non_finite_logit_raises_the_routers_error(kernel_calls):
    moe = random_moe(16, 8, 6, 2)
    x = torch.randn(1, 16)
    x[0, 3] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or infinite"):
        moe(x)
    assert kernel_calls["n"] == 1  # the kernel saw it and handed over to the eager path, which raised


def test_weights_changed_in_place_replaced_or_retyped(kernel_calls):
    moe = random_moe(16, 8, 6, 2, num_shared_experts=1)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))
    tol = fp_tolerance(torch.float32, 16, layers=3, scale=4.0)
    with torch.no_grad():
        moe(x)
        moe.w_out.mul_(2.0)  # in place: the kernel reads the live storage
        torch.testing.assert_close(moe(x).double(), block_token_by_token(moe, x), **tol)
        moe.w_in = torch.nn.Parameter(moe.w_in.detach().flip(0).contiguous())  # a new Parameter
        torch.testing.assert_close(moe(x).double(), block_token_by_token(moe, x), **tol)
        moe.shared.up_proj.weight.data = moe.shared.up_proj.weight.detach() * -1.0  # new storage through .data
        torch.testing.assert_close(moe(x).double(), block_token_by_token(moe, x), **tol)
        calls = kernel_calls["n"]
        moe.double()  # a dtype the kernel does not take: eager from now on
        torch.testing.assert_close(moe(x.double()), block_token_by_token(moe, x), **tol)
    assert kernel_calls["n"] == calls == 4


def test_the_library_is_built_once_per_cpu_and_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEZOO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_decode, "_state", {})
    path = cpu_decode.library_path()
    assert path.parent == tmp_path and not path.exists()
    assert cpu_decode.available()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    monkeypatch.setattr(cpu_decode, "_cpu_flags", lambda: "flags : another cpu kind")
    assert cpu_decode.library_path() != path  # another CPU kind never loads this build


def test_without_a_compiler_the_eager_path_runs_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEZOO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_decode, "_state", {})
    moe = random_moe(16, 8, 6, 2, num_shared_experts=1)
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        y = moe(x)
    assert any("decode kernel is unavailable" in str(w.message) for w in caught)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    torch.testing.assert_close(y.double(), block_token_by_token(moe, x),
                               **fp_tolerance(torch.float32, 16, layers=3, scale=float(y.abs().max())))
    monkeypatch.setenv("MOEZOO_DECODE_KERNEL", "0")
    monkeypatch.setattr(cpu_decode, "_state", {})
    assert not cpu_decode.available()


@pytest.mark.parametrize("T", [1, 4])
def test_moiie_one_modality_call_matches_its_router_and_experts(kernel_calls, T):
    """MoIIE's decoding step: the modality's own router over its intra and the shared experts (softmax top-2,
    renormalised), placed in the layer's expert ids; against the formula, and the record against the eager one."""
    torch.manual_seed(0)
    block = IntraInterMoE(16, 8, 5, num_modalities=3, num_intra=1, num_shared=2).eval()
    reference = IntraInterMoE(16, 8, 5, num_modalities=3, num_intra=1, num_shared=2, backend="reference").eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    reference.load_state_dict(block.state_dict())
    x = torch.randn(1, T, 16, generator=torch.Generator().manual_seed(T))
    modality = torch.full((1, T), 1)
    with torch.no_grad():
        y = block(x, modality)
        reference(x, modality)
    assert kernel_calls["n"] == 1
    columns = block.experts_of(1)  # [1, 3, 4]
    logits = x[0].double() @ block.routers[1].weight.detach().double().t()
    probs = logits.softmax(-1)
    expected = []
    for t in range(T):
        top = probs[t].argsort(descending=True, stable=True)[:2]
        w = probs[t, top] / probs[t, top].sum()
        out = torch.zeros(16, dtype=torch.float64)
        for j, local in enumerate(top.tolist()):
            e = columns[local]
            h = block.w_in.detach()[e].double() @ x[0, t].double()
            out += w[j] * (block.w_out.detach()[e].double() @ (act_formula("silu", h[:8]) * h[8:]))
        expected.append(out)
    tol = fp_tolerance(torch.float32, 16, layers=3, scale=float(y.abs().max()))
    torch.testing.assert_close(y[0].double(), torch.stack(expected), **tol)
    record, eager = block.routing, reference.routing
    assert torch.equal(record.ids_TK, eager.ids_TK) and set(record.ids_TK.flatten().tolist()) <= set(columns)
    torch.testing.assert_close(record.probs_TE, eager.probs_TE, **fp_tolerance(torch.float32, 16, layers=2))
    assert record.probs_TE[:, [0, 2]].abs().max() == 0  # other modalities' intra experts: not routed
    torch.testing.assert_close(record.aux_loss, eager.aux_loss, **fp_tolerance(torch.float32, 16, layers=2))


def test_gshard_top2_in_eval_is_softmax_top2_renormalised(kernel_calls):
    """MoE-LLaVA's router at a decoding step (eval, capacity room for every token): DeepSpeed's top-2 gating
    without noise is the softmax's two best, their weights renormalised."""
    moe = random_moe(16, 8, 4, 2, router="gshard_top2", capacity_factor=1.5, eval_capacity_factor=1.0, min_capacity=4)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = moe(x)
    assert kernel_calls["n"] == 1
    moe.router.renormalize = True  # the formula's reading of the same rule
    expected = block_token_by_token(moe, x)
    torch.testing.assert_close(y.double(), expected, **fp_tolerance(torch.float32, 16, layers=3,
                                                                     scale=float(y.abs().max())))


def test_leading_dimensions_and_non_contiguous_tokens(kernel_calls):
    """A decoding step's [B, S, D] (and a transposed, non-contiguous view of one) comes back in its own shape,
    row for row the flattened tokens' outputs, with the record's tokens_shape the leading dims."""
    moe = random_moe(16, 8, 6, 2, num_shared_experts=1)
    x = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = moe(x)
        assert y.shape == (3, 2, 16) and moe.routing.tokens_shape == (3, 2)
        y_t = moe(x.transpose(0, 1))
    assert kernel_calls["n"] == 2
    tol = fp_tolerance(torch.float32, 16, layers=3, scale=float(y.abs().max()))
    torch.testing.assert_close(y.reshape(6, 16).double(), block_token_by_token(moe, x.reshape(6, 16)), **tol)
    torch.testing.assert_close(y_t, y.transpose(0, 1), **tol)


def dcmoe_block(seed=0, **kwargs):
    return near_tie_dcmoe(12, 8, 4, seed, shared_hidden_dim=6, **kwargs)


def dcmoe_by_formula(block, x_TD):
    """UniMoE-Audio's layer token by token (tests/helpers.py's official routing loop, the shared/dynamic
    softmax, each SwiGLU expert written out): (outputs, chosen experts per token, their applied weights)."""
    N, E, S = block.num_dynamic, block.num_experts, block.num_shared_experts
    rows, chosen_all, weights_all = [], [], []
    for x in x_TD.double():
        logits = block.gate.weight.detach().double() @ x
        chosen, w = unimoe_audio_route_token(logits[:N], block.top_p, block.router_jitter)
        mass, shares = 1.0, []
        if S:
            g = torch.softmax(torch.stack([logits[i] for i in chosen + [N + s for s in range(S)]]), 0)
            mass, shares = g[: len(chosen)].sum(), g[len(chosen):]
        y = torch.zeros_like(x)
        for e, we in zip(chosen, w):
            if e < E:
                y = y + we * mass * expert_on_token(x, e, block.w_in.detach().double(), block.w_out.detach().double(),
                                                    None, None, "silu", True)
        for s, share in enumerate(shares):
            y = y + share * expert_on_token(x, s, block.shared_w_in.detach().double(),
                                            block.shared_w_out.detach().double(), None, None, "silu", True)
        rows.append(y)
        chosen_all.append(chosen)
        weights_all.append(w * mass)
    return torch.stack(rows), chosen_all, weights_all


@pytest.mark.parametrize("shared", [2, 0])
@pytest.mark.parametrize("T", [1, 2, 7, 16])
def test_dynamic_capacity_layer_matches_unimoe_audio_token_by_token(kernel_calls, T, shared):
    block = dcmoe_block(num_shared_experts=shared)
    x = torch.randn(T, 12, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        y = block(x)
    assert kernel_calls["n"] == 1
    expected, chosen, weights = dcmoe_by_formula(block, x)
    tol = fp_tolerance(torch.float32, 12, layers=4, scale=float(y.abs().max()))
    torch.testing.assert_close(y.double(), expected, **tol)
    record = block.routing
    width = max(len(c) for c in chosen)
    assert record.ids_TK.shape == (T, width)
    for t in range(T):
        k = len(chosen[t])
        assert record.ids_TK[t, :k].tolist() == chosen[t] and (record.ids_TK[t, k:] == -1).all()
        torch.testing.assert_close(record.weights_TK[t, :k].double(), weights[t].detach(), **tol)
        assert (record.weights_TK[t, k:] == 0).all()
    eager = dcmoe_block(num_shared_experts=shared, backend="reference")
    with torch.no_grad():
        eager(x)
    assert torch.equal(record.load_E, eager.routing.load_E)
    torch.testing.assert_close(record.probs_TE, eager.routing.probs_TE, **fp_tolerance(torch.float32, 12, layers=2))
    torch.testing.assert_close(record.aux_loss, eager.routing.aux_loss, **fp_tolerance(torch.float32, 12, layers=3))
    if T == 16 and shared:
        assert len({len(c) for c in chosen}) > 1 and any(0 in c and 1 in c for c in chosen)  # varied k, near ties


def test_dynamic_capacity_layer_where_the_kernel_does_not_apply(kernel_calls):
    block = dcmoe_block(token_drop=True, capacity_factor=0.1, min_capacity=1)  # capacity 1 of 4 tokens: drops
    with torch.no_grad():
        block(torch.randn(4, 12))
        block.train()
        block(torch.randn(1, 12))
    assert kernel_calls["n"] == 0


def test_pack_panels_layout():
    """Panel p holds outputs 16p .. 16p+15 side by side for each k, zeros past N: read back by the definition."""
    w = torch.randn(2, 37, 5)
    panels = cpu_decode.pack_panels(w)
    assert panels.shape == (2, 3, 5, 16)
    for e, n, k in [(0, 0, 0), (1, 36, 4), (0, 17, 2), (1, 31, 3)]:
        assert panels[e, n // 16, k, n % 16] == w[e, n, k]
    assert (panels[:, 2, :, 5:] == 0).all()


@pytest.mark.parametrize("T", [1, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("config", ["DiT-MoE (softmax top-2, shared)", "plain MLP experts and shared",
                                    "Mixtral (renormalised, no shared)"])
def test_frozen_layer_packs_its_weights_and_follows_their_updates(kernel_calls, config, T):
    """A frozen block multiplies packed copies (token blocks of 6, panels of 16 outputs: T and the odd widths
    leave remainders); a weight updated in place moves its version and is packed again; unfrozen, the kernel
    reads the live weights."""
    from moezoo.zoo.layers import freeze, unfreeze
    moe = freeze(random_moe(19, 21, 7, 2, **CONFIGS[config]))
    x = torch.randn(T, 19, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        y = moe(x)
        assert moe._decode_prepared["softmax"][2].panels[0] is not None
        tol = fp_tolerance(torch.float32, 21, layers=3, scale=float(y.abs().max()))
        torch.testing.assert_close(y.double(), block_token_by_token(moe, x), **tol)
        moe.w_out.mul_(-0.5)  # in place: autograd's version counter moves
        torch.testing.assert_close(moe(x).double(), block_token_by_token(moe, x), **tol)
        assert moe._decode_prepared["softmax"][2].panels[0] is not None
        unfreeze(moe)
        moe.w_in.data.mul_(2.0)  # through .data: no version, but unfrozen blocks read the live weights
        torch.testing.assert_close(moe(x).double(), block_token_by_token(moe, x), **tol)
        assert moe._decode_prepared["softmax"][2].panels[0] is None
    assert kernel_calls["n"] == 3


def test_frozen_moiie_and_dynamic_capacity_layers_pack_too(kernel_calls):
    """MoIIE's one-modality call and the dynamic-capacity layer, frozen: panel copies, the same outputs."""
    from moezoo.zoo.layers import freeze
    block = dcmoe_block()
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        live = block(x)
        freeze(block)
        packed = block(x)
    assert block._decode_prepared["dynamic"][2].panels[0] is not None
    torch.testing.assert_close(packed.double(), dcmoe_by_formula(block, x)[0],
                               **fp_tolerance(torch.float32, 12, layers=4, scale=float(packed.abs().max())))
    torch.testing.assert_close(packed, live, **fp_tolerance(torch.float32, 12, layers=4, scale=float(live.abs().max())))
    torch.manual_seed(0)
    moiie = IntraInterMoE(16, 8, 5, num_modalities=3, num_intra=1, num_shared=2).eval()
    x = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        live = moiie(x, torch.full((1, 7), 2))
        freeze(moiie)
        packed = moiie(x, torch.full((1, 7), 2))
    assert moiie._decode_prepared[2][2].panels[0] is not None
    torch.testing.assert_close(packed, live, **fp_tolerance(torch.float32, 16, layers=3, scale=float(live.abs().max())))
    assert kernel_calls["n"] == 4


def test_dynamic_capacity_layer_hands_a_non_finite_logit_to_the_eager_error(kernel_calls):
    block = dcmoe_block()
    x = torch.randn(2, 12)
    x[1, 5] = float("inf")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or infinite"):
        block(x)
    assert kernel_calls["n"] == 1


@pytest.mark.parametrize("T", [2, 7, 40])
def test_a_call_split_over_two_threads_is_the_same_layer(kernel_calls, monkeypatch, T):
    """Large calls run as two halves of tokens at once: each half's rows of the outputs and the record are the
    block's token by token, whatever the split."""
    monkeypatch.setattr(cpu_decode, "SPLIT_MIN_MACS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    moe = random_moe(19, 21, 7, 2, **CONFIGS["DeepSeek-V3-like (sigmoid, choice bias, scaling, router bias)"])
    x = torch.randn(T, 19, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        y = moe(x)
    assert kernel_calls["n"] == 1
    tol = fp_tolerance(torch.float32, 21, layers=3, scale=float(y.abs().max()))
    torch.testing.assert_close(y.double(), block_token_by_token(moe, x), **tol)
    ids, weights, scores, logits = route_by_formula(moe, x)
    assert torch.equal(moe.routing.ids_TK, ids)
    torch.testing.assert_close(moe.routing.weights_TK.double(), weights, **tol)
    torch.testing.assert_close(moe.routing.probs_TE.double(), scores, **tol)


def test_a_forked_child_splits_calls_on_its_own_helper_thread(monkeypatch):
    """The helper thread does not survive fork: a child (a DataLoader worker, say) makes its own, not a hang."""
    import os
    import select
    import signal
    monkeypatch.setattr(cpu_decode, "SPLIT_MIN_MACS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    moe = random_moe(16, 8, 6, 2, num_shared_experts=1)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        parent = moe(x)  # the parent's helper exists now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the same call, its result back through the pipe
            try:
                with torch.no_grad():
                    same = torch.equal(moe(x), parent)
                os.write(write, b"1" if same else b"0")
            finally:
                os._exit(0)
        os.close(write)
        ready, _, _ = select.select([read], [], [], 60.0)  # a child stuck on a dead helper never answers
        answer = os.read(read, 1) if ready else b""
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert answer == b"1"
