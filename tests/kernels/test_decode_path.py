"""The decoding paths (a MoE layer on a few tokens without grad) against independent references.

- the torch backend's few-token path (the MoE block's native decode kernel off: its own tests are in
  test_decode_kernel.py; no sort; the chosen experts on views of their weights, or small experts all
  on every token behind a dense gate) against the per-token loop of tests/helpers.py;
- the plan: nothing but checks until a field is read, and what is read equals the slots counted by hand;
- the MoE block at a few tokens against the block computed token by token from its raw parameters (router
  formula, experts, shared MLP), capacity-dropping routers included;
- the routing record of a no-grad forward: summarized only when read, with the values a forward with autograd
  records, whatever forwards ran in between;
- the router's finiteness check and top-k weights, against the definitions.
"""

from __future__ import annotations

import pytest
import torch
from helpers import act_formula, expert_on_token, gshard_kept, loop_moe, random_moe
from tolerance import fp_tolerance

import moezoo.kernels.cpu_backend as cpu_backend
import moezoo.kernels.cpu_decode as cpu_decode
from moezoo.kernels import SharedExpert, build_plan, expert_mlp, topk_route
from moezoo.zoo.layers import MoE
from moezoo.zoo.layers.modality import IntraInterMoE


def output_tol(dtype, reduction):
    """An expert MLP's output computed in another order than the loop's: a reduction over D, then one over F."""
    return fp_tolerance(dtype, reduction, layers=2)


def make_case(T, k, E, *, D=8, F=6, D_out=None, gated=True, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_in = 2 * F if gated else F
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k] if k <= E else torch.randint(0, E, (T, k), generator=g)
    case = dict(x=torch.randn(T, D, generator=g), weights=torch.rand(T, k, generator=g) + 0.1, ids=ids,
                w_in=torch.randn(E, n_in, D, generator=g) * D**-0.5,
                w_out=torch.randn(E, D_out or D, F, generator=g) * F**-0.5,
                b_in=torch.randn(E, n_in, generator=g) * 0.1 if bias else None,
                b_out=torch.randn(E, D_out or D, generator=g) * 0.1 if bias else None)
    return {name: v.to(dtype) if v is not None and v.is_floating_point() else v for name, v in case.items()}


@pytest.fixture
def few_token_calls(monkeypatch):
    """Every no-grad call below takes the few-token path (at most 2^10 slots; the MoE block's native decode kernel,
    tests/kernels/test_decode_kernel.py, off); counts the calls that do, by variant ('views' or 'all': every
    expert on every token)."""
    monkeypatch.setattr(cpu_backend, "FEW_TOKENS_MAX_SLOTS", 1 << 10)
    monkeypatch.setattr(cpu_decode, "MAX_SLOTS", 0)
    calls = {"views": 0, "all": 0}
    forward, all_experts = cpu_backend._few_tokens_forward, cpu_backend._few_tokens_all_experts

    def counting_forward(*args):
        calls["views"] += 1
        return forward(*args)

    def counting_all_experts(*args):
        calls["all"] += 1
        calls["views"] -= 1
        return all_experts(*args)

    monkeypatch.setattr(cpu_backend, "_few_tokens_forward", counting_forward)
    monkeypatch.setattr(cpu_backend, "_few_tokens_all_experts", counting_all_experts)
    return calls


@pytest.fixture(params=["views", "all"])
def variant(request, monkeypatch):
    """The few-token path's two ways: each chosen expert on views of its weights, or (small experts, more than
    one token) every expert on every token behind a dense gate."""
    monkeypatch.setattr(cpu_backend, "FEW_TOKENS_ALL_EXPERTS_MAX_WEIGHTS", 0 if request.param == "views" else 1 << 40)
    return request.param


def no_grad_call(case, capacity=None, activation="silu", gated=True, shared=None):
    plan = build_plan(case["ids"], case["w_in"].shape[0], capacity=capacity)
    with torch.no_grad():
        y = expert_mlp(case["x"], case["weights"], plan, case["w_in"], case["w_out"], b_in_EN=case["b_in"],
                       b_out_ED=case["b_out"], activation=activation, gated=gated, backend="torch", shared=shared)
    return y, plan


# ------------------------------------------------------------------------------------ the few-token path


@pytest.mark.parametrize("T,k,E", [(1, 1, 3), (1, 2, 8), (1, 4, 5), (2, 2, 8), (4, 2, 8), (5, 3, 4), (8, 2, 64),
                                   (16, 1, 2)])
def test_few_token_path_matches_loop(few_token_calls, variant, T, k, E):
    case = make_case(T, k, E, seed=T * 100 + k * 10 + E)
    y, plan = no_grad_call(case)
    ref = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"])
    torch.testing.assert_close(y, ref, **output_tol(torch.float32, 8))
    assert few_token_calls["views"] + few_token_calls["all"] == 1
    assert few_token_calls["all"] == (variant == "all" and T > 1)
    assert "_sorted" not in plan.__dict__  # the plan was never sorted


@pytest.mark.parametrize("activation,gated,bias", [("silu", True, False), ("gelu", False, True),
                                                   ("gelu_tanh", True, True), ("relu", False, False)])
@pytest.mark.parametrize("T", [1, 3])
def test_few_token_path_activations_biases_and_slots_not_dispatched(few_token_calls, variant, activation, gated,
                                                                    bias, T):
    case = make_case(T, 3, 5, gated=gated, bias=bias, seed=7 + T)
    case["ids"][0, 1] = -1  # an unused top-p slot
    case["ids"][T - 1, 2] = 6  # a null expert: not computed
    y, _ = no_grad_call(case, activation=activation, gated=gated)
    ref = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"], case["b_in"], case["b_out"],
                   activation, gated)
    torch.testing.assert_close(y, ref, **output_tol(torch.float32, 8))


@pytest.mark.parametrize("capacity", [1, 2])
def test_few_token_path_keeps_only_the_slots_within_capacity(few_token_calls, variant, capacity):
    case = make_case(6, 2, 3, seed=3)  # 12 slots on 3 experts: capacity 1 or 2 drops most of them
    y, plan = no_grad_call(case, capacity=capacity)
    ref = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"], capacity=capacity)
    torch.testing.assert_close(y, ref, **output_tol(torch.float32, 8))
    kept = gshard_kept(case["ids"], 3, capacity)
    assert plan.kept_ids() == [[int(e) if keep else -1 for e, keep in zip(row, kept_row)]
                               for row, kept_row in zip(case["ids"], kept)]


def test_few_token_path_one_expert_twice_in_a_token(few_token_calls, variant):
    case = make_case(3, 2, 4, seed=9)
    case["ids"][:, 1] = case["ids"][:, 0]  # every token's two slots on one expert: two rows of that token
    y, _ = no_grad_call(case)
    torch.testing.assert_close(y, loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"]),
                               **output_tol(torch.float32, 8))


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("D, D_out", [(8, 8), (8, 5)])
def test_few_token_path_with_a_shared_expert_and_another_output_width(few_token_calls, variant, scale, D, D_out):
    T = 3
    case = make_case(T, 2, 6, D=D, D_out=D_out, bias=True, seed=11)
    g = torch.Generator().manual_seed(12)
    shared = SharedExpert(torch.randn(10, D, generator=g) * D**-0.5, torch.randn(D_out, 5, generator=g) * 0.4,
                          torch.rand(T, generator=g) if scale else None, "gelu")
    y, _ = no_grad_call(case, shared=shared)
    routed = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"], case["b_in"], case["b_out"])
    shared_rows = torch.stack([expert_on_token(x, 0, shared.w_in_NK[None], shared.w_out_DF[None], None, None, "gelu",
                                               True) for x in case["x"]])
    expected = routed + (shared_rows if shared.scale_T is None else shared.scale_T[:, None] * shared_rows)
    torch.testing.assert_close(y, expected, **output_tol(torch.float32, 10))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_few_token_path_in_other_dtypes(few_token_calls, variant, dtype):
    """float16 never runs every expert: an unchosen expert's overflow (inf) times its zero gate would be NaN."""
    case = make_case(2, 2, 8, dtype=dtype, seed=13)
    y, _ = no_grad_call(case)
    assert y.dtype == dtype
    assert few_token_calls["all"] == (variant == "all" and dtype != torch.float16)
    as_double = {n: v.double() if v is not None and v.is_floating_point() else v for n, v in case.items()}
    ref = loop_moe(as_double["x"], as_double["weights"], case["ids"], as_double["w_in"], as_double["w_out"])
    torch.testing.assert_close(y.double(), ref, **output_tol(dtype, 8))


def test_few_token_path_only_without_autograd_and_for_few_slots(few_token_calls, monkeypatch):
    case = make_case(4, 2, 8, seed=14)
    ref = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"])
    leaf = case["w_in"].clone().requires_grad_(True)
    plan = build_plan(case["ids"], 8)
    y = expert_mlp(case["x"], case["weights"], plan, leaf, case["w_out"], backend="torch")  # autograd: the walk
    assert y.requires_grad and few_token_calls == {"views": 0, "all": 0}
    torch.testing.assert_close(y.detach(), ref, **output_tol(torch.float32, 8))
    monkeypatch.setattr(cpu_backend, "FEW_TOKENS_MAX_SLOTS", 7)  # 8 slots: too many
    no_grad_call(case)
    assert few_token_calls == {"views": 0, "all": 0}
    with torch.no_grad():
        expert_mlp(case["x"], case["weights"], build_plan(case["ids"], 8), leaf, case["w_out"], backend="reference")
    assert few_token_calls == {"views": 0, "all": 0}  # the reference backend is never replaced


@pytest.mark.parametrize("few_slots", [0, 1 << 10])
def test_shared_expert_on_the_sorted_padded_path_and_the_few_token_path(monkeypatch, few_slots):
    """The sorted padded path with a shared expert (the path of calls too large for the few-token one) and the
    few-token path, on one case: both equal the loop."""
    monkeypatch.setattr(cpu_backend, "FEW_TOKENS_MAX_SLOTS", few_slots)
    monkeypatch.setattr(cpu_backend, "PADDED_MAX_MACS", 1 << 40)
    case = make_case(13, 2, 6, seed=15)
    case["ids"] = case["ids"] % 3  # experts 3..5 get nothing (and a token may pick one expert twice)
    g = torch.Generator().manual_seed(16)
    shared = SharedExpert(torch.randn(10, 8, generator=g) * 0.3, torch.randn(8, 5, generator=g) * 0.4,
                          torch.rand(13, generator=g))
    y, _ = no_grad_call(case, shared=shared)
    shared_rows = torch.stack([expert_on_token(x, 0, shared.w_in_NK[None], shared.w_out_DF[None], None, None, "silu",
                                               True) for x in case["x"]])
    expected = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"]) + \
        shared.scale_T[:, None] * shared_rows
    torch.testing.assert_close(y, expected, **output_tol(torch.float32, 10))


# ------------------------------------------------------------------------------------------- the lazy plan


def test_plan_is_made_when_read_and_counts_by_hand():
    ids = torch.tensor([[2, 0], [2, -1], [5, 2]])
    plan = build_plan(ids, 3, capacity=2)
    assert not {"kept_TK", "_sorted", "sorted_tokens_S"} & set(plan.__dict__)  # nothing computed yet
    assert plan.kept_ids() == [[2, 0], [2, -1], [-1, -1]]  # expert 2's third slot is over capacity, 5 is no expert
    assert plan.counts_E.tolist() == [1, 0, 2]
    assert plan.sorted_slots_S.tolist() == [1, 0, 2]  # expert 0: slot 1; expert 2: slots 0 and 2
    assert plan.sorted_tokens_S.tolist() == [0, 0, 1]
    assert plan.offsets_E1.tolist() == [0, 1, 1, 3] and plan.num_dispatched == 3
    assert build_plan(ids, 3).kept_ids() == [[2, 0], [2, -1], [-1, 2]]


# ------------------------------------------------------------------------------- the MoE block, token by token


def moe_token_by_token(moe: MoE, x_TD: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Softmax top-k over the routable experts (or DeepSpeed's top-2 gating in eval: the argmax, then the argmax
    of the rest, gates renormalised after the capacity drop), routed experts, null experts (nothing) and the
    shared MLP (gated or not), one token at a time from the raw parameters."""
    logits = x_TD.float() @ moe.router.weight.detach().float().t()
    probs = logits.softmax(-1)
    ids = torch.stack([p.argsort(descending=True, stable=True)[:moe.top_k] for p in probs])
    weights = probs.gather(1, ids)
    kept = gshard_kept(ids, moe.num_experts, capacity)
    rows = []
    for t, x in enumerate(x_TD):
        w = [float(weights[t, j]) if kept[t][j] else 0.0 for j in range(moe.top_k)]
        if moe.router.kind == "gshard_top2" or moe.router.renormalize:
            w = [v / max(sum(w), torch.finfo(torch.float32).eps) for v in w]
        y = torch.zeros_like(x)
        for j in range(moe.top_k):
            if kept[t][j]:  # null experts (ids >= num_experts) are never kept
                y = y + w[j] * expert_on_token(x, int(ids[t, j]), moe.w_in, moe.w_out, None, None, "silu", True)
        if moe.shared is not None:
            s = moe.shared
            a = act_formula("silu", s.gate_proj.weight @ x) * (s.up_proj.weight @ x)
            gate = 1.0 if moe.shared_gate is None else torch.sigmoid(moe.shared_gate.weight[0] @ x)
            y = y + gate * (s.down_proj.weight @ a)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("config", [
    dict(num_shared_experts=1, shared_hidden_dim=24),  # DiT-MoE's layout
    dict(num_shared_experts=1, shared_gate=True, renormalize=True),  # Qwen2-MoE's
    dict(num_null_experts=2),  # null experts: routable, never computed
])
def test_moe_block_at_few_tokens_matches_the_block_token_by_token(few_token_calls, T, config):
    moe = random_moe(16, 12, 6, 2, **config)
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        y = moe(x)
    assert few_token_calls["views"] + few_token_calls["all"] == 1
    tol = fp_tolerance(torch.float32, 24, layers=3)
    torch.testing.assert_close(y, moe_token_by_token(moe, x), **tol)
    torch.testing.assert_close(y, moe(x).detach(), **tol)  # with autograd: the plan's sort and the walk


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("config", [
    dict(num_shared_experts=1, shared_hidden_dim=24),
    dict(num_shared_experts=1, shared_gate=True, renormalize=True),
])
def test_shared_expert_apart_or_inside_at_many_tokens(monkeypatch, onednn, config):
    """Above the few-token path (40 tokens of top-2), with and without autograd: the shared MLP runs apart from
    the routed experts with MKL's GEMMs and inside their walk with oneDNN's (``shared_apart_pays``); either way
    the block and, in training, every parameter's gradient equal the token-by-token loop's. (The decode kernel,
    which would take the no-grad calls, is off: this is the eager path's test.)"""
    monkeypatch.setattr(cpu_backend, "ONEDNN_GEMMS", onednn)
    monkeypatch.setattr(cpu_decode, "MAX_SLOTS", 0)
    moe = random_moe(16, 12, 6, 2, backend="torch", **config)
    packed = []
    as_shared_expert = type(moe.shared).as_shared_expert
    monkeypatch.setattr(type(moe.shared), "as_shared_expert",
                        lambda self, scale_T=None: packed.append(1) or as_shared_expert(self, scale_T))
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(40))
    with torch.no_grad():
        y = moe(x)
    assert bool(packed) == onednn
    tol = fp_tolerance(torch.float32, 24, layers=3)
    torch.testing.assert_close(y, moe_token_by_token(moe, x), **tol)
    packed.clear()
    g = torch.randn(40, 16, generator=torch.Generator().manual_seed(41))
    y_grad = moe(x)
    assert bool(packed) == onednn
    torch.testing.assert_close(y_grad.detach(), y, **tol)
    # the loop's routing weights are constants: the experts' and the shared MLP's (and its gate's) gradients
    named = [(n, p) for n, p in moe.named_parameters() if not n.startswith("router.")]
    grads = torch.autograd.grad((y_grad * g).sum(), [p for _, p in named])
    expected = torch.autograd.grad((moe_token_by_token(moe, x) * g).sum(), [p for _, p in named])
    for (name, _), got, want in zip(named, grads, expected):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("T, capacity_factor, min_capacity", [(1, 1.0, 1), (3, 1.0, 4), (4, 1.0, 4), (6, 0.5, 1)])
def test_capacity_dropping_router_at_few_tokens(few_token_calls, T, capacity_factor, min_capacity):
    """MoE-LLaVA's top-2 gating with a capacity: while every token fits (capacity >= T) nothing can drop and the
    capacity is not applied; below that it drops as it does for any batch."""
    moe = random_moe(16, 12, 3, 2, router="gshard_top2", capacity_factor=capacity_factor, min_capacity=min_capacity,
                   seed=2)
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(20 + T))
    capacity = max(min_capacity, -(-capacity_factor * T * 2 // 3))
    with torch.no_grad():
        y = moe(x)
    torch.testing.assert_close(y, moe_token_by_token(moe, x, int(capacity)), **fp_tolerance(torch.float32, 16, layers=3))
    expected_drops = sum(not keep for row in gshard_kept(moe.routing.ids_TK, 3, int(capacity)) for keep in row)
    assert moe.routing.dropped == expected_drops
    assert (expected_drops > 0) == (capacity < T)  # 6 tokens at capacity 2: 12 slots for 6 places


# ------------------------------------------------------------------------------------------ the lazy record


def test_no_grad_record_is_summarized_when_read_with_an_eager_records_values(monkeypatch):
    moe = random_moe(16, 12, 4, 2, capacity_factor=0.5, num_shared_experts=1,
                   aux_loss_coefs={"load_balance": 0.1, "z_loss": 0.01, "expert_balance": 0.2})
    moe.train()  # the capacity applies (training's factor); no jitter configured: deterministic
    x1, x2 = (torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    moe(x1)
    eager = moe.routing  # autograd: summarized at once
    import moezoo.kernels.losses as losses

    counted = []
    real_counts = losses.expert_counts
    monkeypatch.setattr(losses, "expert_counts", lambda *a: counted.append(1) or real_counts(*a))
    with torch.no_grad():
        moe(x1)
        held = moe.routing
        moe(x2)  # a later forward must not change what the held record says
    assert counted == []  # nothing summarized yet
    assert torch.equal(held.ids_TK, eager.ids_TK) and held.dropped == eager.dropped > 0
    assert counted  # reading summarized it
    torch.testing.assert_close(held.load_E, eager.load_E)
    assert held.aux_terms.keys() == eager.aux_terms.keys()
    for name in eager.aux_terms:
        torch.testing.assert_close(held.aux_terms[name], eager.aux_terms[name])
    torch.testing.assert_close(held.aux_loss, eager.aux_loss.detach())
    assert eager.aux_loss.requires_grad and not held.aux_loss.requires_grad


def test_a_blocks_own_losses_are_those_of_its_forward(monkeypatch):
    """MoIIE's modality balance reads the block's modality ids of the forward: a no-grad record computes it
    only when read, and a record held across another forward (other modalities) still gives its own forward's
    loss."""
    torch.manual_seed(0)
    block = IntraInterMoE(16, 12, 5, num_modalities=3, top_k=2, num_intra=1, num_shared=2)
    balance, calls = block.OWN_AUX_LOSSES["modality_balance"], []
    monkeypatch.setattr(block, "OWN_AUX_LOSSES",
                        {"modality_balance": lambda *args: calls.append(1) or balance(*args)})
    x = torch.randn(1, 6, 16)
    first, second = torch.tensor([[0, 0, 1, 1, 2, 0]]), torch.tensor([[2, 2, 2, 1, 1, 1]])
    block(x, first)
    eager = block.routing.aux_terms["modality_balance"]
    assert calls == [1]
    with torch.no_grad():
        block(x, first)
        held = block.routing
        block(x, second)
    assert calls == [1]  # neither no-grad forward computed it
    torch.testing.assert_close(held.aux_terms["modality_balance"], eager)
    assert not torch.allclose(block.routing.aux_terms["modality_balance"], eager)


def test_losses_that_communicate_are_computed_in_the_forward(monkeypatch):
    """A loss that all-reduces across processes is computed during the forward on every rank, never lazily (a
    rank that did not read its record would leave the others waiting in the collective)."""
    import moezoo.kernels.losses as losses

    calls = []
    real = losses.switch_load_balance_loss
    monkeypatch.setattr(losses, "switch_load_balance_loss", lambda *a, **k: calls.append(k) or real(*a, **k))
    moe = random_moe(16, 12, 4, 2, aux_loss_coefs={"global_load_balance": 0.1, "load_balance": 0.1})
    with torch.no_grad():
        moe(torch.randn(3, 16))
    assert calls == [{"global_batch": True}]  # the collective one only
    moe.routing.aux_terms
    assert calls == [{"global_batch": True}, {}]


# ---------------------------------------------------------------------------------------------------- router


def test_router_refuses_non_finite_logits_and_takes_huge_finite_ones():
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            topk_route(torch.tensor([[0.0, bad, 1.0]]), 1)
    huge = torch.tensor([[3e38, 3e38, -1.0]])  # finite, but their sum overflows float32
    assert torch.isinf(huge.sum())
    out = topk_route(huge, 2)
    assert sorted(out.ids_TK[0].tolist()) == [0, 1]


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_weights_are_the_chosen_scores_with_their_gradients(renormalize):
    """Choosing by the scores themselves (no bias, mask or groups), the weights come from top-k's values: the
    same ids, weights and gradients as choosing with a zero bias (top-k of the detached scores, then gather)."""
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    plain = topk_route(a, 3, renormalize=renormalize)
    biased = topk_route(b, 3, renormalize=renormalize, score_bias_E=torch.zeros(7))
    assert torch.equal(plain.ids_TK, biased.ids_TK)
    torch.testing.assert_close(plain.weights_TK, biased.weights_TK, rtol=0, atol=0)
    probs = logits.softmax(-1)
    by_hand = torch.stack([p[p.argsort(descending=True, stable=True)[:3]] for p in probs])
    expected = by_hand / by_hand.sum(-1, keepdim=True) if renormalize else by_hand
    torch.testing.assert_close(plain.weights_TK.detach(), expected, **fp_tolerance(torch.float32, 7))
    upstream = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    (plain.weights_TK * upstream).sum().backward()
    (biased.weights_TK * upstream).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
