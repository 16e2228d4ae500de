"""MoFME: "Efficient Deweather Mixture-of-Experts with Uncertainty-aware Feature-wise Linear Modulation"
(Zhang et al., AAAI 2024; official code RoyZry98/MoFME-Pytorch, no released weights).

An image restoration network for rain streaks, raindrops, snow and haze::

    f = ConvHead(x)                                    # 3 -> C channels, ResBlocks, full resolution
    t = PatchEmbed_p(f) + PosConv(.)                   # [B, (H/p)(W/p), D] tokens
    t = t + Attn(LN(t));  t = t + FFN(LN(t))           # `depth` transformer layers
    f = f + Unpatchify(Linear(LN(t)))                  # back to [B, C, H, W]
    y = x + ConvTail(f)                                # residual restoration

whose FFN is a Mixture of Feature-Modulation Experts (``ffn="film"``)::

    u   = GELU(A h) * (B h)                            # the ONE shared expert ("basenet"), A, B: D x D
    e_i = gamma_i * u + beta_i                         # expert i: a learned FiLM (scale, shift) of u
    y   = Adaptor( sum_{i in topk} w_i e_i )           # Adaptor: Linear(D, 4D)-GELU-Linear(4D, D)
    w   = UncertaintyRouter(h)                         # top-k, weights sum to 1 over the chosen experts

and two baselines in the same config space, built by the same code so they can be compared one to one:
``ffn="moe"`` — the "conventional MoE" (E full Linear-GELU-Linear experts of width ``mlp_ratio * D``,
the shared :class:`moezoo.zoo.layers.MoE` block, routed by the same uncertainty router) and ``ffn="dense"``
— one Linear-GELU-Linear FFN.

Decisions (where we differ from, or choose among, the paper and the official code):

- FiLM experts are feature-wise vectors ``gamma_i, beta_i in R^D`` (``film="vector"``, the default): FiLM as
  its name says, and what makes the experts nearly free (2D parameters each), which is where the paper's
  ">72% fewer parameters than the conventional MoE" comes from. The official code instead computes the scale
  and shift with two ``D x D`` Linear maps of ``u`` per expert (``e_i = G_i(u) * u + H_i(u)``); that variant
  is ``film="linear"`` (2D^2 per expert: with 8 experts it saves ~60% of the FFN, not 72%). Because the
  chosen weights sum to 1, the vector mixture is computed exactly as one modulation
  ``(sum_i w_i gamma_i) * u + sum_i w_i beta_i`` — no per-expert dispatch at all.
- The Uncertainty-aware Router (:class:`UncertaintyRouter`) is ours, built from the paper's idea. The
  official one (Jan-2025 commit) is broken: its router has no stochasticity, so its 5 "samples" are equal
  and the Mahalanobis-normalised deviations it averages are 0 (all weights 0), and its einsum binds the
  batch axis of one operand to the token axis of the other. See the class for the design.
- No load-balancing loss by default (the official code has none); ``aux_loss_coefs`` adds the MoE block's
  losses by name (our configs use ``load_balance`` 0.01 for both MoE variants, so experts stay in use).
- Position information comes from a depthwise 3x3 convolution on the token grid (a "conditional position
  encoding"), not a fixed table, so any input size that is a multiple of the patch size works (tiles, crops,
  whole photos). The official network uses fixed 240x240 crops.
- Residual output ``y = x + tail`` without a final sigmoid (the official scripts use ``--disable-residual``
  and a sigmoid): a residual network learns much faster in the small CPU budgets here. Clamp for display.
- Images are float RGB in [0, 1].

In this file: :class:`MoFMEConfig`, :class:`UncertaintyRouter`, :class:`FeatureModulatedMoE`, the network
:class:`MoFME`, and the registered entrypoints at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.kernels.experts import BACKENDS
from moezoo.kernels.routing import RouterOutput
from moezoo.zoo.config import check_choice, check_config_types, check_positive
from moezoo.zoo.layers.blocks import Attention, Mlp
from moezoo.zoo.layers.moe import MoE, Router
from moezoo.zoo.layers.routed import RoutedBlock, routing_maps, total_aux_loss
from moezoo.zoo.registry import PretrainedCfg, register_model

__all__ = ["MoFMEConfig", "UncertaintyRouter", "FeatureModulatedMoE", "MoFME", "FFN_KINDS", "FILM_KINDS"]

FFN_KINDS = ("film", "moe", "dense")
FILM_KINDS = ("vector", "linear")


@dataclass
class MoFMEConfig:
    """The MoFME network and its baselines.

    Attributes:
        in_channels: image channels (3: RGB).
        conv_channels: width C of the convolutional head and tail.
        num_res_blocks: ResBlocks in the head (the tail has one).
        patch_size: p; inputs must have H and W divisible by it.
        dim: transformer width D.
        depth: transformer layers.
        num_heads: attention heads.
        mlp_ratio: hidden width of FFNs, conventional experts and the adaptor, as a multiple of D.
        ffn: "film" (MoFME), "moe" (conventional MoE baseline) or "dense" (dense FFN baseline).
        film: "vector" (feature-wise gamma_i, beta_i; default) or "linear" (the official code's
            per-expert Linear maps of u).
        num_experts: E, experts per MoE layer (FiLM experts or full FFN experts).
        top_k: k, experts per token.
        router_samples: S, stochastic router passes per training forward (1: a plain top-k router).
        router_dropout: dropout on the router input for those passes (the source of the samples).
        uncertainty_weight: kappa, how strongly a chosen expert's weight is discounted by its uncertainty.
        aux_loss_coefs: MoE auxiliary losses by name -> coefficient (see ``moezoo.zoo.layers.AUX_LOSSES``).
        backend: the conventional MoE's kernel backend.
    """

    in_channels: int = 3
    conv_channels: int = 16
    num_res_blocks: int = 1
    patch_size: int = 4
    dim: int = 96
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    ffn: str = "film"
    film: str = "vector"
    num_experts: int = 8
    top_k: int = 2
    router_samples: int = 4
    router_dropout: float = 0.1
    uncertainty_weight: float = 1.0
    aux_loss_coefs: dict = field(default_factory=dict)
    backend: str = "auto"

    def __post_init__(self):
        check_config_types(self)
        check_positive(self, ("in_channels", "conv_channels", "patch_size", "dim", "depth", "num_heads",
                              "num_experts", "top_k", "router_samples"))
        check_positive(self, ("num_res_blocks",), least=0)
        check_choice(self, "ffn", FFN_KINDS)
        check_choice(self, "film", FILM_KINDS)
        check_choice(self, "backend", BACKENDS)
        if not self.mlp_ratio > 0 or self.hidden_dim < 1:
            raise ValueError(f"MoFMEConfig.mlp_ratio must make the FFNs at least 1 wide, got {self.mlp_ratio}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.router_samples < 1 or not 0.0 <= self.router_dropout < 1.0:
            raise ValueError(f"router_samples must be >= 1 and router_dropout in [0, 1), got "
                             f"{self.router_samples}, {self.router_dropout}")
        if self.uncertainty_weight < 0:
            raise ValueError(f"uncertainty_weight must be >= 0, got {self.uncertainty_weight}")

    @property
    def hidden_dim(self) -> int:
        return int(self.mlp_ratio * self.dim)


# ----------------------------------------------------------------------------------------------------------
# The Uncertainty-aware Router
# ----------------------------------------------------------------------------------------------------------


class UncertaintyRouter(Router):
    """Top-k routing with weights calibrated by Monte-Carlo router samples (our design of the paper's UaR).

    In training, the router runs ``S`` times on the same tokens with independent dropout on its input
    (Monte-Carlo dropout, Gal & Ghahramani 2016) and turns the samples into routing weights::

        p_s   = softmax(W dropout_s(x))                    s = 1..S
        mu    = mean_s p_s                                 # MC estimate of the routing distribution
        sigma = std_s p_s                                  # its per-expert spread (epistemic uncertainty)
        chosen = topk(mu, k)
        w_e   = mu_e exp(-kappa sigma_e / mu_e) / sum_{chosen} (same)      for e in chosen

    Why: averaging the samples is the MC-dropout predictive distribution, better calibrated than one pass; an
    expert whose probability swings between samples (large coefficient of variation ``sigma / mu``) gets a
    smaller share of the token, and — since the weights are differentiable in ``sigma`` — the router is
    pushed to make assignments that survive perturbation. Every weight is positive and finite (``mu > 0``
    under a softmax; the discount is in (0, 1]) and the chosen weights sum to 1.

    In eval mode there is one deterministic pass (dropout off, the usual MC-dropout mean network): sigma = 0
    and the weights are the renormalised top-k softmax, the same for the same input every time.

    ``probs_TE`` of the output is ``mu`` (what the auxiliary losses see); ``logits_TE`` the mean logits.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, *, samples: int = 4, dropout: float = 0.1,
                 uncertainty_weight: float = 1.0):
        super().__init__(dim, num_experts, top_k, "softmax", renormalize=True)
        self.kind = "uncertainty"
        self.samples, self.dropout, self.uncertainty_weight = samples, dropout, uncertainty_weight

    def extra_repr(self) -> str:
        return (f"experts={self.weight.shape[0]}, top_k={self.top_k}, samples={self.samples}, "
                f"dropout={self.dropout}, uncertainty_weight={self.uncertainty_weight}")

    def forward(self, x_TD: torch.Tensor, allowed_TE: torch.Tensor | None = None) -> RouterOutput:
        if allowed_TE is not None:
            raise ValueError("UncertaintyRouter does not take an allowed-experts mask")
        stochastic = self.training and self.samples > 1 and self.dropout > 0
        passes = self.samples if stochastic else 1
        logits_STE = torch.stack([
            self.logits(F.dropout(x_TD, self.dropout, training=True) if stochastic else x_TD) for _ in range(passes)
        ])
        probs_STE = logits_STE.softmax(-1)
        mu_TE = probs_STE.mean(0)
        weights_TK, ids_TK = mu_TE.topk(self.top_k, dim=-1)
        if passes > 1:  # one pass has no spread: sigma = 0, no discount
            sigma_TK = probs_STE.std(0, unbiased=False).gather(1, ids_TK)
            # mu is a softmax mean, so > 0; the clamp only guards fp32 underflow of a hopeless expert.
            cv_TK = sigma_TK / weights_TK.clamp_min(torch.finfo(weights_TK.dtype).tiny)
            weights_TK = weights_TK * torch.exp(-self.uncertainty_weight * cv_TK)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=mu_TE, logits_TE=logits_STE.mean(0))


# ----------------------------------------------------------------------------------------------------------
# Mixture of Feature-Modulation Experts
# ----------------------------------------------------------------------------------------------------------


class FeatureModulatedMoE(RoutedBlock):
    """MoFME's FFN: one shared expert, E FiLM experts of it, top-k routed, then the adaptor.

    ``forward(x[..., D]) -> [..., D]``; a routed block, so what it routed is in ``self.routing`` after every
    forward, read by ``collect_routing``, ``total_aux_loss`` and the routing maps like every routed layer's.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *, film: str = "vector",
                 router: UncertaintyRouter | None = None, aux_loss_coefs: dict[str, float] | None = None):
        if film not in FILM_KINDS:
            raise ValueError(f"unknown film {film!r}; accepted: {', '.join(FILM_KINDS)}")
        super().__init__(num_experts, top_k, aux_loss_coefs=aux_loss_coefs)
        self.dim, self.hidden_dim, self.film = dim, hidden_dim, film
        self.router = router if router is not None else UncertaintyRouter(dim, num_experts, top_k)
        self.shared_gate_proj = nn.Linear(dim, dim)  # the shared expert: GELU(A h) * B h
        self.shared_up_proj = nn.Linear(dim, dim)
        if film == "vector":
            self.scale_ED = nn.Parameter(torch.empty(num_experts, dim))
            self.shift_ED = nn.Parameter(torch.empty(num_experts, dim))
        else:
            self.scale_EDD = nn.Parameter(torch.empty(num_experts, dim, dim))
            self.scale_bias_ED = nn.Parameter(torch.empty(num_experts, dim))
            self.shift_EDD = nn.Parameter(torch.empty(num_experts, dim, dim))
            self.shift_bias_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.adaptor = Mlp(dim, hidden_dim, dim, act_layer=nn.GELU)  # timm's Linear-GELU-Linear (fc1, fc2)
        self.reset_expert_parameters()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, experts={self.num_experts}, top_k={self.top_k}, "
                f"film={self.film!r}")

    def reset_expert_parameters(self) -> None:
        """FiLM experts start near the identity (scale 1, shift 0) but not equal to one another, so the
        router gets a gradient that tells them apart from the first step."""
        if self.film == "vector":
            nn.init.normal_(self.scale_ED, mean=1.0, std=0.1)
            nn.init.normal_(self.shift_ED, std=0.02)
            return
        bound = self.dim ** -0.5  # nn.Linear's default for each expert's D x D map
        for weight in (self.scale_EDD, self.shift_EDD):
            nn.init.uniform_(weight, -bound, bound)
        nn.init.ones_(self.scale_bias_ED)  # scale = 1 + G_i(u) at init: near the identity too
        nn.init.zeros_(self.shift_bias_ED)

    def forward(self, x: torch.Tensor, allowed_experts: torch.Tensor | None = None) -> torch.Tensor:
        if allowed_experts is not None:
            raise ValueError("FeatureModulatedMoE does not take allowed_experts")
        if x.shape[-1] != self.dim:
            raise ValueError(f"input must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        x_TD = x.reshape(-1, self.dim)
        u_TD = F.gelu(self.shared_gate_proj(x_TD)) * self.shared_up_proj(x_TD)
        routed = self.router(x_TD)
        weights_TK = routed.weights_TK.to(x.dtype)
        if self.film == "vector":
            # sum_k w_k (gamma_k u + beta_k) = (sum_k w_k gamma_k) u + sum_k w_k beta_k: one [T, E] x [E, 2D]
            # product with the routing weights scattered into a dense (mostly zero) [T, E] matrix.
            mix_TE = weights_TK.new_zeros(x_TD.shape[0], self.num_experts).scatter_(1, routed.ids_TK, weights_TK)
            scale_TD, shift_TD = (mix_TE @ torch.cat([self.scale_ED, self.shift_ED], 1)).chunk(2, dim=1)
            mixed_TD = scale_TD * u_TD + shift_TD
        else:
            mixed_TD = self._linear_film_experts(u_TD, routed.ids_TK, weights_TK)
        self.record_routing(routed, lead_shape)
        return self.adaptor(mixed_TD).reshape(x.shape)

    def _linear_film_experts(self, u_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """The official code's experts ``e_i = G_i(u) * u + H_i(u)``, each computed on its own tokens only."""
        out_TD = torch.zeros_like(u_TD)
        for e in range(self.num_experts):
            token_ids, slot = (ids_TK == e).nonzero(as_tuple=True)
            if token_ids.numel() == 0:
                continue
            u_ND = u_TD[token_ids]
            scale_ND = F.linear(u_ND, self.scale_EDD[e], self.scale_bias_ED[e])
            shift_ND = F.linear(u_ND, self.shift_EDD[e], self.shift_bias_ED[e])
            out_TD.index_add_(0, token_ids, weights_TK[token_ids, slot, None] * (scale_ND * u_ND + shift_ND))
        return out_TD


# ----------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """conv3x3-ReLU-conv3x3 with an identity skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def dense_ffn(dim: int, hidden_dim: int) -> nn.Module:
    """The dense FFN baseline (and the shape of one conventional expert): timm's Linear-GELU-Linear."""
    return Mlp(dim, hidden_dim, dim, act_layer=nn.GELU)


def make_ffn(cfg: MoFMEConfig) -> nn.Module:
    """The FFN of one transformer layer, by ``cfg.ffn``; both MoE kinds get the same uncertainty router."""
    if cfg.ffn == "dense":
        return dense_ffn(cfg.dim, cfg.hidden_dim)
    router = UncertaintyRouter(cfg.dim, cfg.num_experts, cfg.top_k, samples=cfg.router_samples,
                               dropout=cfg.router_dropout, uncertainty_weight=cfg.uncertainty_weight)
    if cfg.ffn == "film":
        return FeatureModulatedMoE(cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k, film=cfg.film,
                                   router=router, aux_loss_coefs=cfg.aux_loss_coefs)
    moe = MoE(cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k, expert="mlp", bias=True,
              aux_loss_coefs=cfg.aux_loss_coefs, backend=cfg.backend)
    moe.router = router  # same routing rule as the FiLM experts: the comparison is about the experts only
    return moe


class TransformerLayer(nn.Module):
    """Pre-norm attention + FFN (MoFME, conventional MoE or dense), both residual."""

    def __init__(self, cfg: MoFMEConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = make_ffn(cfg)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = x_BND + self.attn(self.norm1(x_BND))
        return x_BND + self.ffn(self.norm2(x_BND))


class MoFME(nn.Module):
    """The deweathering network: ``forward(x [B, 3, H, W] in [0, 1]) -> restored [B, 3, H, W]`` (not clamped);
    H and W must be multiples of ``config.patch_size``."""

    def __init__(self, config: MoFMEConfig):
        super().__init__()
        self.config = config
        C, D, p = config.conv_channels, config.dim, config.patch_size
        self.head = nn.Sequential(nn.Conv2d(config.in_channels, C, 3, padding=1),
                                  *[ResBlock(C) for _ in range(config.num_res_blocks)])
        self.patch_embed = nn.Conv2d(C, D, kernel_size=p, stride=p)
        self.pos_conv = nn.Conv2d(D, D, 3, padding=1, groups=D)  # conditional position encoding
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D)
        self.unpatch = nn.Linear(D, C * p * p)
        self.tail = nn.Sequential(ResBlock(C), nn.Conv2d(C, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.tail[-1].weight)  # start as the identity map: output = input
        nn.init.zeros_(self.tail[-1].bias)
        self.last_grid: tuple[int, int] | None = None

    def check_input(self, x: torch.Tensor) -> None:
        p, c = self.config.patch_size, self.config.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c or not x.dtype.is_floating_point:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MoFME expects a float tensor [B, {c}, H, W] in [0, 1], got {got}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"H and W must be multiples of the patch size {p}, got {tuple(x.shape[2:])}; "
                             "pad the image, or use DeweatherPipeline which tiles and pads any size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        B, _, H, W = x.shape
        p = self.config.patch_size
        h, w = H // p, W // p
        self.last_grid = (h, w)  # the token grid of this forward, for routing_maps()
        feat = self.head(x)
        grid = self.patch_embed(feat)
        grid = grid + self.pos_conv(grid)
        tokens = grid.flatten(2).transpose(1, 2)
        for layer in self.layers:
            tokens = layer(tokens)
        patches = self.unpatch(self.norm(tokens))  # [B, h*w, C*p*p]
        feat = feat + F.pixel_shuffle(patches.transpose(1, 2).reshape(B, -1, h, w), p)
        return x + self.tail(feat)

    # ------------------------------------------------------------------------------------------ routing

    @property
    def has_routing(self) -> bool:
        return self.config.ffn != "dense"

    def routing_maps(self) -> list[torch.Tensor]:
        """Per MoE layer, the top-1 expert of every patch of the last forward: int64 ``[B, H/p, W/p]`` (an
        empty list for the dense baseline)."""
        if self.has_routing and self.last_grid is None:
            raise RuntimeError("no routing recorded yet: run a forward first")
        return routing_maps(self, grid=self.last_grid)

    def aux_loss(self) -> torch.Tensor:
        """The MoE auxiliary losses of the last forward (0 for the dense baseline or with no coefficients)."""
        return total_aux_loss(self).to(self.unpatch.weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())



def _create(base: MoFMEConfig, **kwargs) -> MoFME:
    known = {f.name for f in fields(MoFMEConfig)}
    unknown = set(kwargs) - known
    if unknown:
        raise ValueError(f"unknown MoFME arguments {sorted(unknown)}; accepted: {', '.join(sorted(known))}")
    return MoFME(replace(base, **kwargs))


# ----------------------------------------------------------------------------------------------------------
# Entrypoints
# ----------------------------------------------------------------------------------------------------------

# The small CPU models of our synthetic-weather comparison (64x64 crops of scikit-image photos).
_WEATHER = MoFMEConfig(conv_channels=16, num_res_blocks=1, patch_size=4, dim=96, depth=2, num_heads=4,
                       num_experts=8, top_k=4, aux_loss_coefs={"load_balance": 0.01})
_TEST = MoFMEConfig(conv_channels=4, num_res_blocks=1, patch_size=2, dim=16, depth=1, num_heads=2,
                    num_experts=4, top_k=2)

_WEATHER_METADATA = dict(
    weather_types=["rain_streaks", "raindrops", "snow", "haze"],
    tile_size=256,  # the pipeline's tiles: 64 px (the training crops) see too little context, 2.4 dB worse
    crop_size=64,
    data="synthetic weather (moezoo.training.datasets.weather) on the 17 train photos of "
         "moezoo.training.datasets.photos (scikit-image, scikit-learn and gradio photographs)",
    training="4000 steps x 16 crops 64x64, AdamW 1e-3 cosine, L1 + 0.01 load balance, early stopping on the 2 val "
             "photos (best: step 3750), one CPU core of an AMD Zen 3, 36.6 min",
    paper="MoFME, Zhang et al., AAAI 2024",
    license="weights: same as moezoo; training photos: as licensed by the packages that ship them "
            "(scikit-image, scikit-learn, gradio)",
)


@register_model(pretrained_cfgs={
    "synthetic": PretrainedCfg(
        file="mofme_weather.safetensors",  # training/configs/mofme_weather.yaml, fp16, 0.66 MB
        sha256="4314eeeda8193c3f15184fb929f6bdcb183fa79bc2feba846938145e1d11eb2d",
        metadata=_WEATHER_METADATA,
    ),
})
def mofme_weather(pretrained: bool = False, **kwargs) -> MoFME:
    """MoFME for rain streaks, raindrops, snow and haze: D=96, 2 layers, 8 FiLM experts top-4, patch 4."""
    return _create(_WEATHER, **kwargs)


@register_model
def mofme_conventional_weather(pretrained: bool = False, **kwargs) -> MoFME:
    """The conventional-MoE baseline of mofme_weather: 8 full Linear-GELU-Linear experts (width 4D) top-4,
    the same uncertainty router."""
    return _create(replace(_WEATHER, ffn="moe"), **kwargs)


@register_model
def mofme_dense_weather(pretrained: bool = False, **kwargs) -> MoFME:
    """The dense baseline of mofme_weather: one Linear-GELU-Linear FFN (width 4D) per layer."""
    return _create(replace(_WEATHER, ffn="dense", aux_loss_coefs={}), **kwargs)


@register_model
def test_mofme(pretrained: bool = False, **kwargs) -> MoFME:
    """A tiny MoFME for CI: C=4, D=16, 1 layer, 4 FiLM experts top-2, patch 2."""
    return _create(_TEST, **kwargs)
