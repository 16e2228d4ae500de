"""The routed-block contract (zoo/layers/routed.py): one base for every layer that routes tokens to experts,
walked by collect_routing / total_aux_loss / set_backend / routing_maps; the house rules of zoo/models; the
config checks every family runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from moezoo.kernels.routing import RouterOutput
from moezoo.zoo import create_model
from moezoo.zoo.layers import (
    MoE,
    MoHAttention,
    RoutedBlock,
    collect_routing,
    routed_blocks,
    routing_maps,
    set_backend,
    total_aux_loss,
)

ZOO = Path(__file__).resolve().parents[2] / "zoo"
FAMILY_VARIANTS = [
    ("test_dit_moe", {}),
    ("test_dit_moe", {"attention": "moh", "num_heads": 4, "moh_shared_heads": 1, "moh_top_k_heads": 2}),
    ("test_dit_moe_video", {}),
    ("test_mofme", {}),
    ("test_mofme", {"ffn": "moe"}),
    ("test_moe_fusion", {}),
    ("test_unimoe_audio", {}),
]


class ArgmaxExperts(RoutedBlock):
    """A routed layer written the way a new family would: its own router (plain argmax of a linear score) and
    experts (one scalar gain each), on the base only."""

    def __init__(self, dim: int, num_experts: int, coefs: dict[str, float]):
        super().__init__(num_experts, 1, aux_loss_coefs=coefs)
        self.score = nn.Linear(dim, num_experts, bias=False)
        self.gain = nn.Parameter(torch.arange(1.0, num_experts + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits_TE = self.score(x.reshape(-1, x.shape[-1]))
        probs_TE = logits_TE.softmax(-1)
        weights_TK, ids_TK = probs_TE.max(-1, keepdim=True)
        self.record_routing(RouterOutput(ids_TK, weights_TK, probs_TE, logits_TE), x.shape[:-1])
        return x * (weights_TK * self.gain[ids_TK]).reshape(*x.shape[:-1], 1)


def test_every_routed_layer_is_a_routed_block_that_ran_the_base_constructor():
    for name, overrides in FAMILY_VARIANTS:
        model = create_model(name, **overrides)
        routed = [m for m in model.modules() if hasattr(m, "routing")]
        assert routed, name
        for module in routed:
            assert isinstance(module, RoutedBlock), (name, type(module).__name__)
            assert "_backend" in module.__dict__ and "aux_loss_coefs" in module.__dict__, type(module).__name__


def test_a_new_routed_layer_is_seen_by_every_walker_with_aux_losses_by_formula():
    torch.manual_seed(0)
    net = nn.Sequential(ArgmaxExperts(6, 3, {"load_balance": 0.5, "z_loss": 0.1}), nn.Tanh(), ArgmaxExperts(6, 3, {}))
    x = torch.randn(2, 5, 6)
    net(x)
    assert [name for name, _ in collect_routing(net)] == ["0", "2"]
    first = net[0]
    logits = x.reshape(-1, 6) @ first.score.weight.T
    probs = logits.softmax(-1)
    top1 = probs.argmax(-1)
    fraction = torch.bincount(top1, minlength=3).float() / top1.numel()
    balance = 3 * (fraction * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(first.routing.aux_terms["load_balance"], balance)
    torch.testing.assert_close(first.routing.aux_terms["z_loss"], z)
    torch.testing.assert_close(total_aux_loss(net), 0.5 * balance + 0.1 * z)
    assert torch.equal(routing_maps(net)[0], top1.reshape(2, 5))
    assert routing_maps(net, grid=(5,))[0].shape == (2, 5)
    assert torch.equal(first.routing.load_E, torch.bincount(top1, minlength=3).float())
    set_backend(net, "reference")
    assert net[0].backend == net[2].backend == "reference"


def test_moh_layers_are_walked_like_moe_layers():
    model = create_model("test_dit_moe", attention="moh", num_heads=4, moh_shared_heads=1, moh_top_k_heads=2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 2])
    model(x, t, y)
    names = [name for name, _ in collect_routing(model)]
    assert names == ["blocks.0.attn", "blocks.0.moe", "blocks.1.attn", "blocks.1.moe"]
    maps = model.routing_maps()
    assert len(maps) == 4 and all(m.shape == (2, 4, 4) for m in maps)
    attn = model.blocks[0].attn
    assert isinstance(attn, MoHAttention)
    assert attn.expert_labels() == ["e0 head 1", "e1 head 2", "e2 head 3"]
    alone = MoHAttention(16, 4, num_shared_heads=1, top_k_heads=2)
    h = torch.randn(2, 5, 16)
    alone(h)
    by_hand = (h @ alone.routed_router.weight.T).softmax(-1).argmax(-1)  # routed head i = head 1 + i
    assert torch.equal(routing_maps(nn.Sequential(alone))[0], by_hand)


def test_only_shared_heads_route_nothing_and_are_not_walked():
    attn = MoHAttention(16, 4, num_shared_heads=4, top_k_heads=0)
    attn(torch.randn(1, 3, 16))
    assert attn.routing is None and routed_blocks(nn.Sequential(attn)) == []


def test_expert_labels_name_special_and_modality_experts():
    moe = MoE(8, 4, 3, 2, num_null_experts=1, num_copy_experts=1)
    assert moe.expert_labels() == ["e0", "e1", "e2", "null 0", "copy 0"]
    fusion = create_model("test_moe_fusion")
    assert fusion.local_foreground.expert_labels() == ["e0 visible", "e1 visible", "e2 infrared", "e3 infrared"]
    assert fusion.global_decoder.expert_labels() == ["e0", "e1", "e2", "e3"]


def test_routing_before_any_forward_is_an_error():
    with pytest.raises(RuntimeError, match="run a forward first"):
        routing_maps(nn.Sequential(MoE(8, 4, 3, 2)))


def test_bad_base_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown aux losses"):
        MoE(8, 4, 3, 2, aux_loss_coefs={"balance": 0.1})
    with pytest.raises(ValueError, match="finite number"):
        MoE(8, 4, 3, 2, aux_loss_coefs={"z_loss": float("nan")})
    with pytest.raises(ValueError, match="expert_names must name each of the 3 experts"):
        RoutedBlock(3, 1, expert_names=["a"])
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        RoutedBlock(3, -1)


# -------------------------------------------------------------------------------------------- house rules


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_family_imports_another_familys_file():
    families = sorted(p for p in (ZOO / "models").glob("*.py") if p.name != "__init__.py")
    for path in families:
        others = {f"moezoo.zoo.models.{p.stem}" for p in families if p != path}
        assert not (_imported_modules(path) & others), f"{path.name} imports another family's file"


def test_families_take_shared_layers_from_the_shared_modules():
    """Attention, patch/timestep/label embeddings live once, in zoo/layers/blocks.py (timm's where timm has it)."""
    shared = {"Attention", "PatchEmbed", "TimestepEmbedder", "LabelEmbedder", "Mlp", "GatedMLP"}
    for path in (ZOO / "models").glob("*.py"):
        defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
        assert not (defined & shared), f"{path.name} defines {defined & shared}"
    import timm.layers

    from moezoo.zoo.layers import blocks

    assert issubclass(blocks.Attention, timm.layers.Attention) and blocks.PatchEmbed is timm.layers.PatchEmbed


# -------------------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("name, field, value, message", [
    ("test_dit_moe", "hidden_size", 1e9, r"DiTMoEConfig.hidden_size must be int, got 1000000000.0"),
    ("test_dit_moe", "depth", "3", r"DiTMoEConfig.depth must be int, got '3'"),
    ("test_dit_moe", "num_experts", True, r"num_experts must be int, got True"),
    ("test_dit_moe", "patch_size", 0, r"DiTMoEConfig.patch_size must be >= 1, got 0"),
    ("test_dit_moe", "mlp_ratio", float("inf"), r"mlp_ratio must be finite"),
    ("test_dit_moe", "backend", "cuda", r"unknown backend 'cuda'"),
    ("test_dit_moe_video", "num_frames", 0, r"num_frames must be >= 1"),
    ("test_mofme", "dim", "16", r"MoFMEConfig.dim must be int"),
    ("test_mofme", "num_res_blocks", -1, r"num_res_blocks must be >= 0"),
    ("test_moe_fusion", "width", 2.0, r"MoEFusionConfig.width must be int"),
    ("test_moe_fusion", "decoder_widths", [8, "x"], r"decoder_widths must be positive channel counts"),
])
def test_configs_name_the_bad_field(name, field, value, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **{field: value})


def test_json_lists_become_tuples():
    assert create_model("test_moe_fusion", decoder_widths=[8, 4]).config.decoder_widths == (8, 4)
