"""MoE-Fusion: "Multi-modal Gated Mixture of Local-to-Global Experts for Dynamic Image Fusion" (Cao et al.,
ICCV 2023; official code SunYM2020/MoE-Fusion, no released weights) — the fusion network, without the detector.

Infrared and visible images (one channel each, the visible one as luminance) are fused by::

    f_v, f_i   = DenseEncoder_v(V), DenseEncoder_i(I)          # conv + 3 dense convs per modality
    a          = max(Att_v(f_v), Att_i(f_i))                   # spatial attention in [0, 1]: "foreground"
    l_fg       = MoLE_fg([l_v * a,     l_i * a])               # Mixture of Local Experts on the foreground
    l_bg       = MoLE_bg([l_v * (1-a), l_i * (1-a)])           # ... and on the background
    F          = MoGE(cat(f_v, f_i, l_fg, l_bg))               # Mixture of Global Experts = the decoder

``l_v, l_i`` are the last dense conv's outputs. In each MoLE half the experts see the visible features and half
the infrared ones (official: experts 0-1 RGB, 2-3 TIR), so the multi-modal gate — which reads both
modalities — decides which modality a region is rebuilt from. The MoGE's experts are whole decoders; its gate
reads the pooled global features. Every gate is Shazeer's noisy top-k (``Router(kind="noisy")`` on
``kernels.noisy_topk_route``) with the CV² importance + load loss (the MoE block's ``"cv2"`` aux loss), coefficient
0.01 for the MoLEs and 0.02 for the MoGE, as the official code.

Losses (:func:`fusion_loss`): the gradient loss ``L1(|Sobel F|, max(|Sobel V|, |Sobel I|))`` (weight 10) and the
intensity loss ``L1(F, max(V, I))`` inside the foreground mask + ``L1(F, (V + I) / 2)`` outside (weight 1).

Decisions (where we differ from, or choose among, the paper and the official code):

- No detector. Officially the attention maps come from the two Faster R-CNN branches (trained by detection)
  and the intensity loss's foreground is the ground-truth boxes. Here each modality has its own small
  attention head (the official head's shape: 1x1 conv-BN-ReLU-1x1 conv-BN-sigmoid, at 1/4 resolution, upsampled
  as the official ``x4``), and the foreground mask is whatever the data provides: our synthetic pairs know
  their warm objects, and the training module supervises the attention with them (the detector's role). Data
  without masks uses ``max(V, I)`` everywhere as the intensity target.
- Gates see pooled features. The official gates are Linear maps of the *flattened* downsampled features
  (614,400 and 768,000 inputs), which fixes the image size to 640x480. Ours pool first, so any size works:
  the MoGE gate reads the encoder features average-pooled to a ``global_gate_grid`` square (flattened, so it
  still sees the layout), one decision per image as in the paper. The MoLE gate reads the mean features of
  each ``local_cell`` x ``local_cell`` cell: one routing decision per cell, which is what makes the routing maps
  show which modality's experts rebuilt each region. ``local_cell=None`` gives the official per-image gate.
- Experts are combined by the weighted sum ``sum_i g_i E_i(x)`` of the paper. The official code combines in
  exp/log space (``log sum_i g_i exp(E_i(x))``), a convention of the Shazeer dispatcher it copied, made for
  log-probabilities, which turns the decoder's output into a soft maximum of its experts'.
- The dense convs have no activation, as in the official encoder; the decoder output has none either (the
  intensity loss keeps it in range; pipelines clamp to [0, 1]). The decoders' last bias starts at 0.5 (mid-grey):
  from zero, 150 CPU steps of the bundled config left the fused images black (intensity loss 0.40 vs 0.10 with
  the 0.5 start, total loss 2.14 vs 1.42, measured when the bundled model was first trained).
- Inputs are float [B, 1, H, W] in [0, 1], infrared first: ``model(infrared, visible)``.

In this file: :class:`MoEFusionConfig`, :class:`ConvExpertMoE` (conv experts on the MoE block's contract),
the network :class:`MoEFusion`, the losses, and the registered entrypoints at the bottom.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.zoo.config import check_config_types, check_positive
from moezoo.zoo.layers.moe import Router
from moezoo.zoo.layers.routed import RoutedBlock, routed_blocks, routing_maps, total_aux_loss
from moezoo.zoo.registry import PretrainedCfg, register_model

__all__ = [
    "MoEFusionConfig",
    "ConvExpertMoE",
    "MoEFusion",
    "sobel_gradient",
    "gradient_loss",
    "intensity_loss",
    "fusion_loss",
]


@dataclass
class MoEFusionConfig:
    """The MoE-Fusion network.

    Attributes:
        width: channels of the first conv and of each dense conv (official 16); each encoder outputs 4x this.
        num_local_experts: experts per MoLE, an even number: the first half read the visible features, the
            second half the infrared ones (official 4).
        local_hidden: a local expert's hidden channels (official 8): conv3x3(width->h)-ReLU-conv3x3(h->width).
        num_global_experts: decoder experts in the MoGE (official 4).
        decoder_widths: a decoder expert's hidden channels (official 64, 32, 16), then a conv to 1 channel.
        top_k: experts per gate decision in every MoE (official 2).
        local_cell: the MoLE gate decides per cell of this many pixels; None: once per image (official).
        global_gate_grid: the MoGE gate reads the features average-pooled to this square grid, flattened.
        attention_stride: the attention heads work at 1/stride resolution, then upsample (official 4).
        local_aux_coef, global_aux_coef: CV² importance+load loss coefficients (official 0.01, 0.02).
    """

    width: int = 16
    num_local_experts: int = 4
    local_hidden: int = 8
    num_global_experts: int = 4
    decoder_widths: tuple[int, ...] = (64, 32, 16)
    top_k: int = 2
    local_cell: int | None = None
    global_gate_grid: int = 4
    attention_stride: int = 4
    local_aux_coef: float = 0.01
    global_aux_coef: float = 0.02

    def __post_init__(self):
        check_config_types(self)  # JSON configs give lists: decoder_widths becomes a tuple
        check_positive(self, ("width", "local_hidden", "num_global_experts", "global_gate_grid", "attention_stride",
                              "top_k", "local_cell"))
        if self.num_local_experts < 2 or self.num_local_experts % 2:
            raise ValueError(
                f"num_local_experts must be even and >= 2 (half per modality), got {self.num_local_experts}"
            )
        if not self.decoder_widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                              for w in self.decoder_widths):
            raise ValueError(f"decoder_widths must be positive channel counts, got {self.decoder_widths}")
        if not 1 <= self.top_k <= min(self.num_local_experts, self.num_global_experts):
            raise ValueError(f"top_k must be between 1 and the number of experts, got {self.top_k}")

    @property
    def encoder_channels(self) -> int:
        """Channels of one modality's encoder output: the first conv and three dense convs, concatenated."""
        return 4 * self.width

    @property
    def fused_channels(self) -> int:
        """The decoder's input: both encoders plus the foreground and background MoLE outputs."""
        return 2 * self.encoder_channels + 2 * self.width


# ----------------------------------------------------------------------------------------------------------
# Conv experts on the MoE block's contract
# ----------------------------------------------------------------------------------------------------------


def cell_tokens(x_BCHW: torch.Tensor, cell: int | None) -> torch.Tensor:
    """The gate's tokens: the mean of ``x`` over each ``cell`` x ``cell`` cell (partial cells at the right and
    bottom edges average the pixels they have) as ``[B, gh, gw, C]``; ``cell=None``: one token per image."""
    if cell is None:
        return x_BCHW.mean((2, 3))[:, None, None, :]
    pooled = F.avg_pool2d(x_BCHW, cell, stride=cell, ceil_mode=True)  # ceil_mode: edge windows divide by their size
    return pooled.permute(0, 2, 3, 1)


def cells_to_pixels(value_BGG: torch.Tensor, cell: int | None, height: int, width: int) -> torch.Tensor:
    """A per-cell value ``[B, gh, gw]`` painted over the pixels of its cell: ``[B, 1, H, W]``."""
    if cell is None:
        return value_BGG.reshape(-1, 1, 1, 1).expand(-1, 1, height, width)
    pixels = value_BGG.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    return pixels[:, None, :height, :width]


class ConvExpertMoE(RoutedBlock):
    """Convolutional experts chosen per cell (or per image) by a noisy top-k gate.

    ``forward(inputs, gate_tokens, cell) -> [B, out_channels, H, W]``: ``gate_tokens [B, gh, gw, D]`` are routed
    (top-k of ``num_experts``), expert ``e`` runs on ``inputs[expert_sources[e]]`` for the images that chose it
    in at least one cell, and each pixel gets ``sum_k w_k E_k(x)`` with the weights of its cell.

    A routed block: ``self.routing`` records ``tokens_shape = (B, gh, gw)``, so ``collect_routing``,
    ``total_aux_loss`` and routing maps work as for every routed layer; the CV² loss is the ``"cv2"`` aux loss.
    ``expert_names`` (optional, one per expert) label the experts in pictures, e.g. the modality each reads.
    """

    def __init__(
        self,
        gate_dim: int,
        experts: Sequence[nn.Module],
        out_channels: int,
        top_k: int,
        *,
        expert_sources: Sequence[int] | None = None,
        expert_names: Sequence[str] | None = None,
        aux_coef: float = 0.01,
    ):
        num_experts = len(experts)
        sources = tuple(expert_sources) if expert_sources is not None else (0,) * num_experts
        if len(sources) != num_experts or min(sources, default=0) < 0:
            raise ValueError(f"expert_sources must give one input index >= 0 per expert, got {sources}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and the {num_experts} experts, got {top_k}")
        super().__init__(num_experts, top_k, aux_loss_coefs={"cv2": aux_coef}, expert_names=expert_names)
        self.dim, self.expert_sources, self.out_channels = gate_dim, sources, out_channels
        self.router = Router(gate_dim, num_experts, top_k, "noisy")
        self.experts = nn.ModuleList(experts)

    def extra_repr(self) -> str:
        return (
            f"gate_dim={self.dim}, experts={self.num_experts}, top_k={self.top_k}, "
            f"sources={self.expert_sources}, out_channels={self.out_channels}"
        )

    def forward(
        self, inputs: Sequence[torch.Tensor], gate_tokens: torch.Tensor, cell: int | None = None
    ) -> torch.Tensor:
        if gate_tokens.dim() != 4 or gate_tokens.shape[-1] != self.dim:
            raise ValueError(f"gate_tokens must be [B, gh, gw, {self.dim}], got shape {tuple(gate_tokens.shape)}")
        if len(inputs) <= max(self.expert_sources):
            raise ValueError(f"the experts read inputs {sorted(set(self.expert_sources))}, got {len(inputs)} inputs")
        batch, grid_h, grid_w, _ = gate_tokens.shape
        height, width = inputs[0].shape[-2:]
        routed = self.router(gate_tokens.reshape(-1, self.dim))
        ids_BNK = routed.ids_TK.view(batch, grid_h * grid_w, -1)
        weights_BNK = routed.weights_TK.view(batch, grid_h * grid_w, -1).to(inputs[0].dtype)

        out = inputs[0].new_zeros(batch, self.out_channels, height, width)
        for e, expert in enumerate(self.experts):
            chosen_BNK = ids_BNK == e
            images = chosen_BNK.flatten(1).any(1).nonzero().flatten()
            if images.numel() == 0:
                continue  # sparsity: an expert no cell chose is not computed
            weight_bN = (weights_BNK[images] * chosen_BNK[images]).sum(-1)
            weight_map = cells_to_pixels(weight_bN.view(-1, grid_h, grid_w), cell, height, width)
            out = out.index_add(0, images, weight_map * expert(inputs[self.expert_sources[e]][images]))
        self.record_routing(routed, (batch, grid_h, grid_w))
        return out


def local_expert(width: int, hidden: int) -> nn.Module:
    """A MoLE expert (official ``ConvLayer``): conv3x3(width -> hidden)-ReLU-conv3x3(hidden -> width)."""
    return nn.Sequential(nn.Conv2d(width, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, width, 3, padding=1))


def decoder_expert(in_channels: int, widths: Sequence[int]) -> nn.Module:
    """A MoGE expert (official ``DecoderLayer``): conv3x3-ReLU through ``widths``, then conv3x3 to 1 channel."""
    layers, channels = [], in_channels
    for w in widths:
        layers += [nn.Conv2d(channels, w, 3, padding=1), nn.ReLU()]
        channels = w
    out = nn.Conv2d(channels, 1, 3, padding=1)
    # Start at mid-grey, the level of the images being fused: from a zero start the first few hundred steps go
    # to finding the brightness (the 10x gradient loss is blind to it), and the fused images are black meanwhile.
    nn.init.constant_(out.bias, 0.5)
    layers.append(out)
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------


class DenseEncoder(nn.Module):
    """One modality's encoder (official ``Encoder`` branch): conv3x3(1 -> w)-ReLU, then three dense conv3x3
    (each reads everything before it, no activation). Returns (all four outputs concatenated, the last one)."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.dense = nn.ModuleList(nn.Conv2d(width * (i + 1), width, 3, padding=1) for i in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(self.stem(x))
        last = features
        for conv in self.dense:
            last = conv(features)
            features = torch.cat([features, last], 1)
        return features, last


class SpatialAttention(nn.Module):
    """A foreground map in [0, 1] from a modality's features, computed at 1/stride resolution and upsampled
    bilinearly (the official attention head's layers: 1x1 conv-BN-ReLU-1x1 conv-BN-sigmoid)."""

    def __init__(self, in_channels: int, hidden: int, stride: int):
        super().__init__()
        self.stride = stride
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, 1, 1), nn.BatchNorm2d(1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        size = features.shape[-2:]
        pooled = features
        if self.stride > 1:
            pooled = F.avg_pool2d(features, self.stride, stride=self.stride, ceil_mode=True)
        attention = torch.sigmoid(self.head(pooled))
        return F.interpolate(attention, size=size, mode="bilinear", align_corners=False)


class MoEFusion(nn.Module):
    """The MoE-Fusion network: ``forward(infrared [B,1,H,W], visible [B,1,H,W]) -> fused [B,1,H,W]``."""

    def __init__(self, config: MoEFusionConfig):
        super().__init__()
        self.config = cfg = config
        self.infrared_encoder = DenseEncoder(cfg.width)
        self.visible_encoder = DenseEncoder(cfg.width)
        self.infrared_attention = SpatialAttention(cfg.encoder_channels, cfg.width, cfg.attention_stride)
        self.visible_attention = SpatialAttention(cfg.encoder_channels, cfg.width, cfg.attention_stride)
        half = cfg.num_local_experts // 2
        sources = (0,) * half + (1,) * half  # input 0: visible features, input 1: infrared features

        names = ["visible"] * half + ["infrared"] * half

        def mole() -> ConvExpertMoE:
            experts = [local_expert(cfg.width, cfg.local_hidden) for _ in range(cfg.num_local_experts)]
            return ConvExpertMoE(2 * cfg.width, experts, cfg.width, cfg.top_k, expert_sources=sources,
                                 expert_names=names, aux_coef=cfg.local_aux_coef)

        self.local_foreground = mole()
        self.local_background = mole()
        decoders = [decoder_expert(cfg.fused_channels, cfg.decoder_widths) for _ in range(cfg.num_global_experts)]
        self.global_decoder = ConvExpertMoE(cfg.fused_channels * cfg.global_gate_grid**2, decoders, 1, cfg.top_k,
                                            aux_coef=cfg.global_aux_coef)

    def check_inputs(self, infrared: torch.Tensor, visible: torch.Tensor) -> None:
        for name, x in (("infrared", infrared), ("visible", visible)):
            if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating torch tensor [B, 1, H, W] in [0, 1]")
            if x.dim() != 4 or x.shape[1] != 1:
                raise ValueError(f"{name} must be [B, 1, H, W] (one channel: luminance), got {tuple(x.shape)}")
        if infrared.shape != visible.shape:
            raise ValueError(
                f"infrared and visible must be registered pairs of the same shape, got {tuple(infrared.shape)} "
                f"and {tuple(visible.shape)}"
            )
        if min(infrared.shape[-2:]) < 4:
            raise ValueError(f"images must be at least 4x4 pixels, got {tuple(infrared.shape[-2:])}")

    def forward(self, infrared: torch.Tensor, visible: torch.Tensor, return_attention: bool = False):
        """Fuse registered pairs. With ``return_attention``, also the foreground map [B, 1, H, W] in [0, 1]."""
        self.check_inputs(infrared, visible)
        cfg = self.config
        visible_features, visible_last = self.visible_encoder(visible)
        infrared_features, infrared_last = self.infrared_encoder(infrared)
        attention = torch.maximum(self.visible_attention(visible_features), self.infrared_attention(infrared_features))
        local = []
        for moe, mask in ((self.local_foreground, attention), (self.local_background, 1.0 - attention)):
            parts = [visible_last * mask, infrared_last * mask]
            local.append(moe(parts, cell_tokens(torch.cat(parts, 1), cfg.local_cell), cfg.local_cell))
        encoded = torch.cat([visible_features, infrared_features, *local], 1)
        global_tokens = F.adaptive_avg_pool2d(encoded, cfg.global_gate_grid).flatten(1)[:, None, None, :]
        fused = self.global_decoder([encoded], global_tokens, None)
        return (fused, attention) if return_attention else fused

    # ------------------------------------------------------------------------------------------ routing

    def routing_maps(self) -> list[torch.Tensor]:
        """Per MoE layer (foreground MoLE, background MoLE, MoGE), the top-1 expert of every gate decision of
        the last forward: int64 ``[B, gh, gw]`` — one entry per ``local_cell`` cell, ``[B, 1, 1]`` for a
        per-image gate. MoLE experts below ``num_local_experts // 2`` read the visible image, the rest infrared
        (their ``expert_names``)."""
        return routing_maps(self)

    def routing_layer_names(self) -> list[str]:
        return [name for name, _ in routed_blocks(self)]

    def aux_loss(self) -> torch.Tensor:
        """The CV² importance + load losses of the last forward, weighted (keeps the graph)."""
        return total_aux_loss(self)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_gradient(x_B1HW: torch.Tensor) -> torch.Tensor:
    """``|Sobel_x * x| + |Sobel_y * x|`` with zero padding (the official ``Sobelxy``), same shape as ``x``."""
    if x_B1HW.dim() != 4 or x_B1HW.shape[1] != 1:
        raise ValueError(f"sobel_gradient takes [B, 1, H, W] images, got shape {tuple(x_B1HW.shape)}")
    kx = torch.tensor(_SOBEL_X, dtype=x_B1HW.dtype, device=x_B1HW.device)
    kernels = torch.stack([kx, kx.t()])[:, None]  # [2, 1, 3, 3]: x then y (sign is irrelevant under abs)
    return F.conv2d(x_B1HW, kernels, padding=1).abs().sum(1, keepdim=True)


def gradient_loss(fused: torch.Tensor, infrared: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The official ``NewGradLoss``: ``mean |grad F - max(grad V, grad I)|`` with ``grad = sobel_gradient``."""
    target = torch.maximum(sobel_gradient(visible), sobel_gradient(infrared))
    return F.l1_loss(sobel_gradient(fused), target)


def intensity_loss(
    fused: torch.Tensor, infrared: torch.Tensor, visible: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The official ``DetcropPixelLoss`` with a mask instead of boxes: the mean over pixels of
    ``m |F - max(V, I)| + (1 - m) |F - (V + I) / 2|``; without a mask, ``m = 1`` everywhere."""
    brightest = torch.maximum(visible, infrared)
    if mask is None:
        return F.l1_loss(fused, brightest)
    if mask.shape != fused.shape:
        raise ValueError(f"mask must have the images' shape {tuple(fused.shape)}, got {tuple(mask.shape)}")
    mean = (visible + infrared) / 2
    return (mask * (fused - brightest).abs() + (1 - mask) * (fused - mean).abs()).mean()


def fusion_loss(
    fused: torch.Tensor,
    infrared: torch.Tensor,
    visible: torch.Tensor,
    mask: torch.Tensor | None = None,
    grad_weight: float = 10.0,
    intensity_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The fusion objective (official weights 10 and 1): ``{"loss", "grad_loss", "intensity_loss"}``."""
    grad = gradient_loss(fused, infrared, visible)
    intensity = intensity_loss(fused, infrared, visible, mask)
    return {"loss": grad_weight * grad + intensity_weight * intensity, "grad_loss": grad, "intensity_loss": intensity}


# ----------------------------------------------------------------------------------------------------------
# Registered models
# ----------------------------------------------------------------------------------------------------------

_OFFICIAL = MoEFusionConfig()
# The bundled CPU model: half the official widths, a per-16-pixel MoLE gate (routing maps per region).
_IRVIS = MoEFusionConfig(width=8, local_hidden=8, decoder_widths=(32, 16, 8), local_cell=16)
_TEST = MoEFusionConfig(width=4, local_hidden=4, decoder_widths=(8,), local_cell=8, global_gate_grid=2)


def _create(base: MoEFusionConfig, **kwargs) -> MoEFusion:
    known = {f.name for f in fields(MoEFusionConfig)}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"unknown MoE-Fusion options {sorted(unknown)}; accepted: {', '.join(sorted(known))}")
    values = {f.name: getattr(base, f.name) for f in fields(MoEFusionConfig)}
    return MoEFusion(MoEFusionConfig(**{**values, **kwargs}))


@register_model
def moe_fusion(pretrained: bool = False, **kwargs) -> MoEFusion:
    """The official widths (width 16, decoder 64-32-16, 4+4+4 experts top-2) with per-image gates."""
    return _create(_OFFICIAL, **kwargs)


@register_model(pretrained_cfgs={
    "synthetic": PretrainedCfg(
        file="moe_fusion_irvis.safetensors",
        sha256="e1f1c310928804d13414d81f6e43e7bbcca3ef44939d341eec4c79ceb9ae11ca",
        metadata={
            "task": "infrared-visible fusion (one channel: infrared + visible luminance)",
            "data": "synthetic registered pairs from scikit-image photographs (training/datasets/fusion_pairs.py)",
            "config": "training/configs/moe_fusion_irvis.yaml",
            # stopped by --trainer.max_time 00:00:24:00 (one shared CPU core) before the config's 2700 steps
            "trained_steps": 2369,
            "training": "2369 steps x 8 pairs of 64x64 on one CPU thread: 24.2 min wall, 16.5 min CPU",
            "paper": "Cao et al., ICCV 2023, Multi-modal Gated Mixture of Local-to-Global Experts",
        },
    ),
})
def moe_fusion_irvis(pretrained: bool = False, **kwargs) -> MoEFusion:
    """The bundled model: width 8, decoder 32-16-8, MoLE gate per 16x16 cell, trained on synthetic pairs."""
    return _create(_IRVIS, **kwargs)


@register_model
def test_moe_fusion(pretrained: bool = False, **kwargs) -> MoEFusion:
    """A tiny MoE-Fusion for CI: width 4, one decoder layer of 8, MoLE gate per 8x8 cell."""
    return _create(_TEST, **kwargs)
