"""Upcycling (moezoo.zoo.upcycle): dense FFNs -> experts, checked by formula. "split": expert i holds hidden units
[i F/n, (i+1) F/n) and the n experts, evaluated one by one with the per-token expert formula
(tests/helpers.py: ``expert_on_token``), sum to the dense FFN. "copy": every expert equals the FFN, and a block's
output is (sum of the token's routing weights, computed here from the router's weight) times the FFN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.layers.activations import GELUTanh

from moezoo.zoo.layers import DynamicCapacityMoE, GatedMLP, MoE, routed_blocks
from moezoo.zoo.upcycle import average_state_dicts, expert_weights, moe_from_dense, upcycle
from helpers import expert_on_token, randomise
from tolerance import fp_tolerance

DIM, HIDDEN = 8, 12
TOL = fp_tolerance(torch.float32, HIDDEN, layers=3)


def inputs(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dense_ffns():
    """(name, FFN) for every dense FFN kind understood, with random weights and biases."""
    ffns = {
        "swiglu": GatedMLP(DIM, HIDDEN),
        "gelu_mlp": GatedMLP(DIM, HIDDEN, activation="gelu", gated=False),
        "swiglu_bias": GatedMLP(DIM, HIDDEN, bias=True),
        "timm_mlp": Mlp(DIM, HIDDEN),
        "timm_mlp_tanh": Mlp(DIM, HIDDEN, act_layer=GELUTanh, bias=(True, False)),
        "timm_mlp_relu": Mlp(DIM, HIDDEN, act_layer=nn.ReLU, bias=False),
    }
    return [(name, randomise(ffn, seed=i)) for i, (name, ffn) in enumerate(ffns.items())]


def experts_on_token(w, x_D, experts):
    return [expert_on_token(x_D, e, w.w_in, w.w_out, w.b_in, w.b_out, w.activation, w.gated) for e in experts]


# ------------------------------------------------------------------------------------------------ split and copy


@pytest.mark.parametrize("name, ffn", dense_ffns())
@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_slices_sum_to_the_dense_ffn(name, ffn, n):
    w = expert_weights(ffn, n, "split")
    width = HIDDEN // n
    assert w.w_in.shape[0] == n and w.hidden_dim == width
    x = inputs(5, DIM)
    for t in range(5):
        torch.testing.assert_close(sum(experts_on_token(w, x[t], range(n))), ffn(x[t]), **TOL)
    # expert i holds hidden units [i F/n, (i+1) F/n): its input rows and output columns
    if isinstance(ffn, GatedMLP):
        first_in, out = (ffn.gate_proj if ffn.gated else ffn.up_proj), ffn.down_proj
    else:
        first_in, out = ffn.fc1, ffn.fc2
    for i in range(n):
        units = slice(i * width, (i + 1) * width)
        assert torch.equal(w.w_in[i, :width], first_in.weight[units])
        assert torch.equal(w.w_out[i], out.weight[:, units])


@pytest.mark.parametrize("name, ffn", dense_ffns())
def test_copies_are_identical_and_a_renormalised_moe_equals_the_ffn(name, ffn):
    moe = moe_from_dense(ffn, 4, "copy", top_k=2, renormalize=True).eval()
    for e in range(1, 4):
        assert torch.equal(moe.w_in[e], moe.w_in[0]) and torch.equal(moe.w_out[e], moe.w_out[0])
    x = inputs(2, 5, DIM, seed=2)
    torch.testing.assert_close(moe(x), ffn(x), **TOL)


def test_a_copy_moe_without_renormalising_scales_the_ffn_by_the_chosen_weights():
    ffn = randomise(GatedMLP(DIM, HIDDEN))
    moe = moe_from_dense(ffn, 4, "copy", top_k=2)
    x = inputs(6, DIM, seed=3)
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    chosen_mass = probs.topk(2, dim=-1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(moe(x), chosen_mass * ffn(x), **TOL)


def test_top_p_copies_equal_the_ffn_too():
    ffn = randomise(Mlp(DIM, HIDDEN), seed=4)
    moe = moe_from_dense(ffn, 6, "copy", top_k=6, router="top_p", top_p=0.6, renormalize=True)
    x = inputs(7, DIM, seed=4)
    torch.testing.assert_close(moe(x), ffn(x), **TOL)


def test_several_protos_give_their_experts_in_order_to_a_dcmoe():
    protos = [randomise(GatedMLP(DIM, HIDDEN), seed=s) for s in (5, 6)]
    block = moe_from_dense(protos, 8, "split", block=DynamicCapacityMoE, shared_hidden_dim=3).eval()
    assert block.num_experts == 8 and block.hidden_dim == HIDDEN // 4
    w = expert_weights(protos, 8, "split")
    assert torch.equal(block.w_in, w.w_in) and torch.equal(block.w_out, w.w_out)
    x = inputs(3, DIM, seed=5)
    for t in range(3):
        torch.testing.assert_close(sum(experts_on_token(w, x[t], range(4))), protos[0](x[t]), **TOL)
        torch.testing.assert_close(sum(experts_on_token(w, x[t], range(4, 8))), protos[1](x[t]), **TOL)
    assert block(x).shape == (3, DIM)


def test_experts_follow_the_ffns_dtype_and_share_no_storage():
    ffn = GatedMLP(DIM, HIDDEN).to(torch.float64)
    moe = moe_from_dense(ffn, 2, "split")
    assert moe.w_in.dtype == moe.router.weight.dtype == torch.float64
    with torch.no_grad():
        moe.w_in.zero_()
    assert ffn.gate_proj.weight.abs().sum() > 0


@pytest.mark.parametrize("call, error, message", [
    (lambda: expert_weights(GatedMLP(DIM, HIDDEN), 2, "merge"), ValueError, "unknown upcycling mode 'merge'"),
    (lambda: expert_weights([GatedMLP(DIM, HIDDEN)] * 2, 3), ValueError, "positive multiple of the 2 dense FFN"),
    (lambda: expert_weights(GatedMLP(DIM, HIDDEN), 5, "split"), ValueError, "5 must divide it"),
    (lambda: expert_weights([], 2), ValueError, "at least one dense FFN"),
    (lambda: expert_weights(nn.Linear(DIM, DIM), 2), TypeError, "cannot upcycle a Linear: dense FFNs understood are"),
    (lambda: expert_weights(Mlp(DIM, HIDDEN, drop=0.1), 2), ValueError, "with dropout"),
    (lambda: expert_weights(Mlp(DIM, HIDDEN, norm_layer=nn.LayerNorm), 2), ValueError, "hidden norm"),
    (lambda: expert_weights(Mlp(DIM, HIDDEN, out_features=4), 2), ValueError, "maps 8 -> 4"),
    (lambda: expert_weights(Mlp(DIM, HIDDEN, act_layer=nn.Tanh), 2), ValueError, "Tanh has no expert kernel"),
    (lambda: expert_weights([GatedMLP(DIM, HIDDEN), GatedMLP(DIM, 2 * HIDDEN)], 2), ValueError, "must be alike"),
    (lambda: moe_from_dense(GatedMLP(DIM, HIDDEN), 2, activation="relu"), TypeError, "activation come"),
    (lambda: moe_from_dense(GatedMLP(DIM, HIDDEN), 2, block=nn.Linear), TypeError, "block must be MoE or Dynamic"),
    (lambda: moe_from_dense(Mlp(DIM, HIDDEN), 2, block=DynamicCapacityMoE), ValueError, "not gated with biases"),
])
def test_bad_upcycling_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------------------------ upcycle()


class TinyModel(nn.Module):
    """Two residual blocks with a dense FFN each, and a MoE whose shared experts are a GatedMLP too."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(DIM), "mix": nn.Linear(DIM, DIM), "mlp": GatedMLP(DIM, HIDDEN)})
            for _ in range(2)
        )
        self.moe = MoE(DIM, 4, 2, 1, num_shared_experts=1)
        self.register_buffer("steps", torch.tensor(3))

    def forward(self, x):
        for block in self.blocks:
            h = x + block["mix"](block["norm"](x))
            x = h + block["mlp"](h)
        return self.moe(x)


def test_upcycle_replaces_the_standalone_dense_ffns_and_keeps_the_function():
    model = randomise(TinyModel()).eval()
    x = inputs(2, 3, DIM, seed=7)
    before = model(x)
    names = upcycle(model, lambda name, ffn: moe_from_dense(ffn, 4, "copy", top_k=2, renormalize=True))
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]  # moe.shared (a GatedMLP inside a routed block) left alone
    assert isinstance(model.blocks[1]["mlp"], MoE) and isinstance(model.moe.shared, GatedMLP)
    assert [n for n, _ in routed_blocks(model)] == ["blocks.0.mlp", "blocks.1.mlp", "moe"]
    torch.testing.assert_close(model.eval()(x), before, **fp_tolerance(torch.float32, HIDDEN, layers=8))


def test_upcycle_selects_by_glob_or_predicate_and_reports_errors():
    with pytest.raises(TypeError, match="cannot upcycle a LayerNorm"):
        upcycle(TinyModel(), lambda n, f: moe_from_dense(f, 2, "split"), select="blocks.1.*")
    model = TinyModel()
    assert upcycle(model, lambda n, f: moe_from_dense(f, 2, "split"), select="blocks.1.mlp") == ["blocks.1.mlp"]
    assert isinstance(model.blocks[0]["mlp"], GatedMLP)
    # a selected module's children are left to it
    replaced = upcycle(TinyModel(), lambda n, f: nn.Identity(), select=lambda n, m: n.startswith("blocks.0"))
    assert replaced == ["blocks.0"]
    with pytest.raises(ValueError, match="no module of TinyModel matched select"):
        upcycle(TinyModel(), lambda n, f: f, select="decoder.*")
    with pytest.raises(TypeError, match="must return an nn.Module, got int"):
        upcycle(TinyModel(), lambda n, f: 3)
    with pytest.raises(TypeError, match="select must be a glob string"):
        upcycle(TinyModel(), lambda n, f: f, select=3)


# ------------------------------------------------------------------------------------------------ averaging


def test_average_state_dicts_by_formula():
    models = [randomise(TinyModel(), seed=s) for s in (1, 2, 3)]
    averaged = average_state_dicts([m.state_dict() for m in models])
    assert list(averaged) == list(models[0].state_dict())
    for key, value in averaged.items():
        tensors = [m.state_dict()[key] for m in models]
        if value.dtype.is_floating_point:
            mean = (tensors[0].double() + tensors[1].double() + tensors[2].double()) / 3
            torch.testing.assert_close(value, mean.float(), **fp_tolerance(torch.float32, 3))
        else:
            assert torch.equal(value, tensors[0])
    ones, zeros = torch.ones(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16)
    half = average_state_dicts([{"w": ones}, {"w": zeros}])
    assert half["w"].dtype == torch.bfloat16 and half["w"].tolist() == [0.5, 0.5]


def test_average_state_dicts_errors():
    a, b = TinyModel().state_dict(), TinyModel().state_dict()
    b["steps"] = torch.tensor(4)
    with pytest.raises(ValueError, match="'steps' is a torch.int64 tensor that differs"):
        average_state_dicts([a, b])
    with pytest.raises(ValueError, match=r"state dict 1 has other keys than state dict 0: missing \['steps'\]"):
        average_state_dicts([a, {k: v for k, v in a.items() if k != "steps"}])
    with pytest.raises(ValueError, match="differs in shape or dtype"):
        average_state_dicts([{"w": torch.ones(2)}, {"w": torch.ones(3)}])
    with pytest.raises(ValueError, match="at least one state dict"):
        average_state_dicts([])


def test_unimoe_audio_stage_two_from_two_dense_protos():
    """The recipe of the module docstring: attention and norms averaged, each proto's FFN split into routed experts."""
    protos = [randomise(TinyModel(), seed=s) for s in (4, 5)]
    merged = copy.deepcopy(protos[0])
    merged.load_state_dict(average_state_dicts([p.state_dict() for p in protos]))
    names = upcycle(merged, lambda name, _: moe_from_dense([p.get_submodule(name) for p in protos], 8, "split",
                                                           block=DynamicCapacityMoE, shared_hidden_dim=3),
                    select="blocks.*.mlp")
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]
    torch.testing.assert_close(merged.blocks[1]["norm"].weight,
                               (protos[0].blocks[1]["norm"].weight + protos[1].blocks[1]["norm"].weight) / 2)
    x = inputs(4, DIM, seed=8)
    for i in range(2):
        block = merged.blocks[i]["mlp"]
        w = expert_weights([p.blocks[i]["mlp"] for p in protos], 8, "split")
        assert isinstance(block, DynamicCapacityMoE) and torch.equal(block.w_in, w.w_in)
        for t in range(4):
            for proto, experts in zip(protos, (range(4), range(4, 8))):
                dense = proto.blocks[i]["mlp"](x[t])
                torch.testing.assert_close(sum(experts_on_token(w, x[t], experts)), dense, **TOL)
    assert merged(inputs(2, 3, DIM)).shape == (2, 3, DIM)


def test_widen_keeps_the_output_and_the_new_units_learn():
    from moezoo.zoo.upcycle import widen

    narrow = randomise(GatedMLP(DIM, HIDDEN), seed=3)
    wide = widen(narrow, 3)
    assert wide.up_proj.out_features == 3 * HIDDEN
    x = inputs(5, DIM)
    # by formula: down(silu(gate x) * up x) over the old units only, since the new units' output columns are 0
    h = torch.nn.functional.silu(x @ narrow.gate_proj.weight.T) * (x @ narrow.up_proj.weight.T)
    torch.testing.assert_close(wide(x), h @ narrow.down_proj.weight.T, **TOL)
    assert torch.equal(wide.down_proj.weight[:, HIDDEN:], torch.zeros(DIM, 2 * HIDDEN))
    wide(x).square().sum().backward()
    assert wide.down_proj.weight.grad[:, HIDDEN:].abs().sum() > 0  # not stuck: the new units get gradient
    new_rows = wide.up_proj.weight[HIDDEN:]
    assert not torch.equal(new_rows[:HIDDEN], narrow.up_proj.weight)  # fresh, not copies of the old units
    with pytest.raises(ValueError, match="factor"):
        widen(narrow, 0)
    with pytest.raises(TypeError, match="GatedMLP"):
        widen(nn.Linear(2, 2), 2)
