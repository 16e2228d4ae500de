"""A small multimodal MoE language model: pictures and sounds in, words out — the understanding side of the zoo,
with the seed papers' FFN layouts side by side on one backbone (a config field, ``ffn``):

- ``"dense"``: a SwiGLU FFN in every layer (the LLaVA-style baseline);
- ``"moe_llava"``: MoE-LLaVA (arXiv 2401.15947): experts upcycled from the dense FFN, DeepSpeed's top-2 gating
  (the second expert sampled with Gumbel noise in training), capacity factor 1.5 in training / 1.0 at
  inference, balance loss 0.01, in every layer or every other one (``moe_layers``);
- ``"moiie"``: MoIIE (arXiv 2508.09779): per modality its own intra-modality experts plus experts shared by all,
  one router per modality, softmax top-2 renormalised, a balance loss per modality (0.001 each);
- ``"moma"``: MoMa (arXiv 2407.21770): one expert group per modality, expert-choice routing inside the group,
  an auxiliary router for causal inference;
- ``"mot"``: Mixture-of-Transformers (arXiv 2411.04996): every attention and FFN weight and norm untied by
  modality, chosen by the token's modality id (no router), attention global over the sequence.

One forward::

    image [B, 3, 64, 64] -> ImageEncoder (a timm ViT) -> patch tokens [B, 64, C] -> 2x2 merge [B, 16, 4C] -> connector
    audio [B, N] at 16 kHz -> AudioEncoder (Whisper's layout) -> frame tokens [B, T, C_a] -> connector
    sequence = <bos> [image tokens] [audio tokens] prompt words <sep> answer words <eos>
    modality ids: 0 text, 1 image, 2 audio (MODALITIES) — they travel with the sequence and drive every
    modality-aware layer; nothing below assumes two modalities.

Connectors (``connector``): LLaVA-1.5's MLP projector, a query resampler, or MoCHA's MoE connector. The
2x2 merge (Qwen2-VL's patch merger) shortens the image to 16 tokens so the language model stays cheap on a CPU.

The decoder block places its norms as Chameleon does (the backbone MoMa and MoT were built on):
``h = x + norm(attn(x))``, ``out = h + norm(ffn(h))`` — which is also what MoT's reference layers compute with
their per-modality output norms, so MoT starts from a dense model exactly (:meth:`MoEVLM.upcycle`).
Positions (``positions``): a learned absolute table, or M-RoPE (Qwen2-VL): rotary positions whose image tokens
carry their grid row and column, so attention compares where two patches are, and text tokens plain 1-D ids
after the media. Word-level vocabulary (``config.vocabulary``).

Upcycling (:meth:`MoEVLM.upcycle`, on :mod:`moezoo.zoo.upcycle`): a trained dense model becomes any layout with
the same outputs at step 0 where the design allows (MoE-LLaVA, MoIIE: expert copies with weights renormalised to
1; MoT: per-modality copies; dense: :func:`~moezoo.zoo.upcycle.widen` to the routed models' active width);
MoMa's expert-choice weights are not normalised, so it starts close to, not at, the dense model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.encoders.audio import SAMPLE_RATE, AudioEncoder, num_frames
from moezoo.encoders.image import TINY_IMAGE_MODEL, ImageEncoder
from moezoo.encoders.words import WordVocabulary
from moezoo.zoo.config import check_choice, check_config_types, check_positive
from moezoo.zoo.layers.blocks import CausalSelfAttention, GatedMLP, KVCache, Rotary, multimodal_rotary
from moezoo.zoo.layers.connectors import MoEConnector, QueryResampler, mlp_projector
from moezoo.zoo.layers.modality import (
    IntraInterMoE,
    ModalityGroupMoE,
    ModalityUntiedAttention,
    ModalityUntiedFeedForward,
)
from moezoo.zoo.layers.moe import MoE
from moezoo.zoo.layers.routed import RoutedBlock, total_aux_loss
from moezoo.zoo.registry import PretrainedCfg, register_model
from moezoo.zoo.upcycle import expert_weights, widen

__all__ = ["MoEVLMConfig", "MoEVLM", "FFN_KINDS", "CONNECTORS", "MODALITIES", "GenerationOutput"]

FFN_KINDS = ("dense", "moe_llava", "moiie", "moma", "mot")
CONNECTORS = ("mlp", "resampler", "moe")
POSITIONS = ("learned", "mrope")
MODALITIES = ("text", "image", "audio")
TEXT, IMAGE, AUDIO = range(3)
PAD, BOS, SEP, EOS = "<pad>", "<bos>", "<sep>", "<eos>"


@dataclass
class MoEVLMConfig:
    """Everything that defines the architecture.

    Attributes:
        vocabulary: the words of prompts and answers (others read as ``<unk>``).
        max_prompt_tokens, max_answer_tokens: the longest prompt and answer (in words).
        image_encoder: an :class:`~moezoo.encoders.image.ImageEncoder` name (ours or timm's); None: no images.
        image_encoder_args: timm overrides for it (``embed_dim``, ``depth``, ...); image_layer: the block read.
        image_merge: merge ``m x m`` neighbouring patch tokens into one (their features concatenated).
        audio_dim, audio_depth: the audio encoder's width and blocks (depth 0: no audio);
        max_audio_seconds: the longest sound read (sets the positions).
        connector: "mlp", "resampler" (``num_queries`` tokens per input) or "moe" (MoCHA: ``connector_experts``,
            top ``connector_top_k``).
        dim, depth, num_heads: the language model; qk_norm: RMS-normalised queries and keys per head (Chameleon's
            QK-norm; the blocks normalise only their outputs, so without it the attention logits scale with the
            residual stream, tiny at the start).
        positions: "learned" (an absolute table) or "mrope" (rotary, 2-D on the image grid; module docstring).
        ffn: the FFN layout (:data:`FFN_KINDS`). ffn_hidden: the dense FFN's width (MoT: each modality's).
        num_experts, top_k, expert_hidden: MoE-LLaVA's experts (routed width each).
        moe_layers: "all", "every_other" (layers 1, 3, ...: MoE-LLaVA) or a list of layer indices.
        capacity_factor, eval_capacity_factor, min_capacity: MoE-LLaVA's capacity (DeepSpeed's).
        moe_aux_loss: MoE-LLaVA's balance-loss coefficient.
        moiie_intra, moiie_shared: MoIIE's experts per modality and shared experts.
        moma_experts: MoMa's experts per modality group (one number for all or one per modality).
    """

    vocabulary: tuple[str, ...]
    max_prompt_tokens: int = 32
    max_answer_tokens: int = 24
    image_encoder: str | None = TINY_IMAGE_MODEL
    image_encoder_args: dict = field(default_factory=dict)
    image_layer: int = -1
    image_merge: int = 2
    audio_dim: int = 96
    audio_depth: int = 2
    max_audio_seconds: float = 1.1
    connector: str = "mlp"
    num_queries: int = 16
    connector_experts: int = 4
    connector_top_k: int = 2
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    qk_norm: bool = False
    positions: str = "learned"
    ffn: str = "dense"
    ffn_hidden: int = 256
    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 256
    moe_layers: str | tuple[int, ...] = "all"
    capacity_factor: float = 1.5
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    moe_aux_loss: float = 0.01
    moiie_intra: int = 1
    moiie_shared: int = 2
    moma_experts: int | tuple[int, ...] = 2

    def __post_init__(self):
        self.vocabulary = tuple(self.vocabulary)
        if isinstance(self.moe_layers, list):
            self.moe_layers = tuple(self.moe_layers)
        if isinstance(self.moma_experts, list):
            self.moma_experts = tuple(self.moma_experts)
        check_config_types(self)
        check_choice(self, "ffn", FFN_KINDS)
        check_choice(self, "connector", CONNECTORS)
        check_choice(self, "positions", POSITIONS)
        check_positive(self, ("max_prompt_tokens", "max_answer_tokens", "image_merge", "audio_dim", "num_queries",
                              "connector_experts", "connector_top_k", "dim", "depth", "num_heads", "ffn_hidden",
                              "num_experts", "top_k", "expert_hidden", "min_capacity", "moiie_intra", "moiie_shared"))
        check_positive(self, ("max_audio_seconds", "capacity_factor", "eval_capacity_factor"), least=0.1)
        if self.audio_depth < 0:
            raise ValueError(f"audio_depth must be >= 0 (0: no audio), got {self.audio_depth}")
        if self.image_encoder is None and self.audio_depth == 0:
            raise ValueError("a model needs an image encoder, an audio encoder or both")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of num_heads ({self.num_heads})")
        if isinstance(self.moe_layers, str):
            check_choice(self, "moe_layers", ("all", "every_other"))
        elif not all(isinstance(i, int) and 0 <= i < self.depth for i in self.moe_layers):
            raise ValueError(f"moe_layers must be 'all', 'every_other' or layer indices in [0, {self.depth}), got "
                             f"{self.moe_layers!r}")
        groups = self.moma_experts if isinstance(self.moma_experts, tuple) else (self.moma_experts,) * len(MODALITIES)
        if len(groups) != len(MODALITIES) or min(groups) < 1:
            raise ValueError(f"moma_experts must be a positive number or one per modality {MODALITIES}, got "
                             f"{self.moma_experts!r}")

    @property
    def routed_layers(self) -> tuple[int, ...]:
        """The layers whose FFN routes (MoE-LLaVA's ``moe_layers``; every layer for the other routed layouts)."""
        if self.ffn in ("dense", "mot"):
            return ()
        if self.ffn != "moe_llava" or self.moe_layers == "all":
            return tuple(range(self.depth))
        if self.moe_layers == "every_other":
            return tuple(range(1, self.depth, 2))
        return tuple(sorted(self.moe_layers))

    @property
    def moma_groups(self) -> tuple[int, ...]:
        return self.moma_experts if isinstance(self.moma_experts, tuple) else (self.moma_experts,) * len(MODALITIES)


def _connector(config: MoEVLMConfig, in_dim: int) -> nn.Module:
    if config.connector == "mlp":
        return mlp_projector(in_dim, config.dim)
    if config.connector == "resampler":
        return QueryResampler(in_dim, config.dim, num_queries=config.num_queries, num_heads=config.num_heads)
    return MoEConnector(in_dim, config.dim, config.connector_experts, config.connector_top_k)


def _make_ffn(config: MoEVLMConfig, layer: int) -> nn.Module:
    M = len(MODALITIES)
    if config.ffn == "mot":
        return ModalityUntiedFeedForward(config.dim, config.ffn_hidden, M)
    if layer not in config.routed_layers:
        return GatedMLP(config.dim, config.ffn_hidden)
    if config.ffn == "moe_llava":
        return MoE(config.dim, config.expert_hidden, config.num_experts, 2, router="gshard_top2",
                   capacity_factor=config.capacity_factor, eval_capacity_factor=config.eval_capacity_factor,
                   min_capacity=config.min_capacity, aux_loss_coefs={"top1_balance": config.moe_aux_loss})
    if config.ffn == "moiie":
        return IntraInterMoE(config.dim, config.expert_hidden, M * config.moiie_intra + config.moiie_shared, M,
                             config.top_k, num_intra=config.moiie_intra, num_shared=config.moiie_shared)
    return ModalityGroupMoE(config.dim, config.expert_hidden, config.moma_groups, M, config.top_k)


class DecoderBlock(nn.Module):
    """``h = x + norm(attn(x))``, ``out = h + norm(ffn(h))`` (Chameleon's placement); MoT's untied layers carry
    their own per-modality norms."""

    def __init__(self, config: MoEVLMConfig, layer: int):
        super().__init__()
        self.untied = config.ffn == "mot"
        if self.untied:
            self.attn = ModalityUntiedAttention(config.dim, config.num_heads, len(MODALITIES), qk_norm=config.qk_norm)
            self.attn_norm = self.ffn_norm = None
        else:
            self.attn = CausalSelfAttention(config.dim, config.num_heads, qk_norm=config.qk_norm)
            self.attn_norm, self.ffn_norm = nn.RMSNorm(config.dim, eps=1e-6), nn.RMSNorm(config.dim, eps=1e-6)
        self.ffn = _make_ffn(config, layer)

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor, cache: KVCache | None = None,
                rotary: Rotary | None = None) -> torch.Tensor:
        if self.untied:
            h = x_BSD + self.attn(x_BSD, modality_BS, cache, rotary)
            return h + self.ffn(h, modality_BS)
        h = x_BSD + self.attn_norm(self.attn(x_BSD, cache, rotary))
        if isinstance(self.ffn, (IntraInterMoE, ModalityGroupMoE)):
            return h + self.ffn_norm(self.ffn(h, modality_BS))
        return h + self.ffn_norm(self.ffn(h))


@dataclass
class GenerationOutput:
    """What :meth:`MoEVLM.generate` returns: the answers, their word ids, and (asked for) the routing.

    ``routing[layer][row]``: the experts of every token of that row's sequence (prompt and generated) in that
    layer, ``[S, k]`` (-1: an unused slot; MoT: the modality's weights), with ``modality[row]`` ``[S]`` the
    tokens' modality ids; None for a layer that does not route."""

    text: list[str]
    token_ids: list[list[int]]
    routing: list[list[torch.Tensor | None]] | None = None
    modality: list[torch.Tensor] | None = None


class MoEVLM(nn.Module):
    """The model (see the module docstring). Inputs of one call share their media: ``images [B, 3, H, W]`` in
    [-1, 1] for every row or None, ``audio [B, N]`` (16 kHz) for every row or None."""

    def __init__(self, config: MoEVLMConfig):
        super().__init__()
        self.config = config
        self.vocab = WordVocabulary(config.vocabulary, specials=(PAD, BOS, SEP, EOS))
        self.image_encoder = self.image_connector = None
        self.num_image_tokens = 0
        if config.image_encoder is not None:
            self.image_encoder = ImageEncoder(config.image_encoder, layer=config.image_layer,
                                              **config.image_encoder_args)
            patches = self._encoder_patches()
            self.image_connector = _connector(config, self.image_encoder.dim * config.image_merge**2)
            self.num_image_tokens = (config.num_queries if config.connector == "resampler"
                                     else patches // config.image_merge**2)
        self.audio_encoder = self.audio_connector = None
        self.num_audio_tokens = 0
        if config.audio_depth:
            max_tokens = AudioEncoder.num_tokens(num_frames(int(config.max_audio_seconds * SAMPLE_RATE)))
            self.audio_encoder = AudioEncoder(config.audio_dim, config.audio_depth, max_tokens=max_tokens)
            self.audio_connector = _connector(config, config.audio_dim)
            self.num_audio_tokens = config.num_queries if config.connector == "resampler" else max_tokens
        self.embed = nn.Embedding(len(self.vocab), config.dim)
        self.max_positions = (2 + self.num_image_tokens + self.num_audio_tokens + config.max_prompt_tokens
                              + config.max_answer_tokens + 1)
        self.pos_embed = nn.Parameter(torch.zeros(self.max_positions, config.dim)) if config.positions == "learned" else None
        self.blocks = nn.ModuleList(DecoderBlock(config, i) for i in range(config.depth))
        self.norm = nn.RMSNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, len(self.vocab), bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _encoder_patches(self) -> int:
        """How many patch tokens the image encoder gives, and a check that the merge fits their grid."""
        with torch.no_grad():
            tokens = self.image_encoder(torch.zeros(1, 3, *self.image_encoder.input_size)).shape[1]
        side, m = math.isqrt(tokens), self.config.image_merge
        if side * side != tokens or side % m:
            raise ValueError(f"{self.config.image_encoder!r} gives {tokens} patch tokens: a square grid whose side is "
                             f"a multiple of image_merge={m} is needed")
        return tokens

    # ------------------------------------------------------------------------------------------ inputs

    @property
    def image_size(self) -> tuple[int, int] | None:
        return None if self.image_encoder is None else tuple(self.image_encoder.input_size)

    def special_id(self, name: str) -> int:
        return self.vocab.special_id(name)

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.vocab.encode(prompt)
        if not ids:
            raise ValueError("the prompt has no words; ask a question (e.g. 'what shape is the red object?')")
        if len(ids) > self.config.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(ids)} words; this model reads at most {self.config.max_prompt_tokens}")
        return ids

    def encode_answer(self, answer: str) -> list[int]:
        ids = self.vocab.encode(answer)
        if len(ids) > self.config.max_answer_tokens:
            raise ValueError(f"the answer has {len(ids)} words; this model writes at most {self.config.max_answer_tokens}")
        return ids + [self.special_id(EOS)]

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> ``[B, N_img, D]``."""
        if self.image_encoder is None:
            raise ValueError("this model has no image encoder (config.image_encoder is None)")
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(f"images must be [B, 3, {self.image_size[0]}, {self.image_size[1]}] in [-1, 1], got "
                             f"shape {tuple(images.shape)}")
        patches = self.image_encoder(images)
        if self.config.connector == "resampler":
            return self.image_connector(patches)
        return self.image_connector(_merge_patches(patches, self.config.image_merge))

    def audio_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` at 16 kHz -> ``[B, N_aud, D]`` (shorter clips are padded with silence to the longest read)."""
        if self.audio_encoder is None:
            raise ValueError("this model has no audio encoder (config.audio_depth is 0)")
        if audio.dim() != 2:
            raise ValueError(f"audio must be [B, N] samples at {SAMPLE_RATE} Hz, got shape {tuple(audio.shape)}")
        limit = int(self.config.max_audio_seconds * SAMPLE_RATE)
        if audio.shape[1] > limit:
            raise ValueError(f"audio of {audio.shape[1] / SAMPLE_RATE:.2f} s is longer than the {self.config.max_audio_seconds} s "
                             "this model reads")
        audio = F.pad(audio, (0, limit - audio.shape[1]))
        frames, mask = self.audio_encoder(audio)
        if self.config.connector == "resampler":
            return self.audio_connector(frames, mask)
        return self.audio_connector(frames)

    def _media(self, images, audio) -> tuple[list[torch.Tensor], list[int]]:
        parts, modalities = [], []
        if images is not None:
            parts.append(self.image_tokens(images))
            modalities.append(IMAGE)
        if audio is not None:
            parts.append(self.audio_tokens(audio))
            modalities.append(AUDIO)
        return parts, modalities

    def sequence(self, images: torch.Tensor | None, audio: torch.Tensor | None, word_ids: Sequence[Sequence[int]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The embedded sequences ``<bos> media words``, right-padded: ``(x [B, S, D], modality [B, S], length [B],
        position ids [3, 1, S])`` (learned positions already added; the ids drive M-RoPE). ``word_ids[b]``: row b's
        prompt, ``<sep>``, and any answer."""
        parts, media_modalities = self._media(images, audio)
        B = len(word_ids)
        if any(p.shape[0] != B for p in parts):
            raise ValueError(f"{B} prompts but {[p.shape[0] for p in parts]} images/sounds: one of each per prompt")
        media_len = sum(p.shape[1] for p in parts)
        lengths = torch.tensor([1 + media_len + len(w) for w in word_ids])
        S = int(lengths.max())
        if S > self.max_positions:
            raise ValueError(f"a sequence of {S} tokens is longer than the model's {self.max_positions} positions")
        ids = torch.full((B, S - 1 - media_len), self.special_id(PAD), dtype=torch.long)
        for b, w in enumerate(word_ids):
            ids[b, : len(w)] = torch.as_tensor(w, dtype=torch.long)
        device = self.embed.weight.device
        bos = self.embed(torch.full((B, 1), self.special_id(BOS), device=device))
        x = torch.cat([bos, *[p.to(bos.dtype) for p in parts], self.embed(ids.to(device))], dim=1)
        modality = torch.full((B, S), TEXT, dtype=torch.long, device=device)
        start = 1
        for p, m in zip(parts, media_modalities):
            modality[:, start: start + p.shape[1]] = m
            start += p.shape[1]
        positions = self.position_ids(media_modalities, S).to(device)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:S]
        return x, modality, lengths, positions

    def position_ids(self, media_modalities: Sequence[int], length: int) -> torch.Tensor:
        """``[3, 1, S]`` (temporal, height, width) ids, Qwen2-VL's layout: ``<bos>`` 0; an image of ``g x g``
        tokens starting at id s takes (s, s + row, s + col) and the next token s + g; audio and text tokens one
        id each, thrice. A resampler's queries are no grid: they count as a 1-D run."""
        ids, next_id = [torch.zeros(3, 1, dtype=torch.long)], 1
        for m in media_modalities:
            count = self.num_image_tokens if m == IMAGE else self.num_audio_tokens
            if m == IMAGE and self.config.connector != "resampler":
                side = math.isqrt(count)
                row, col = torch.arange(count) // side, torch.arange(count) % side
                ids.append(torch.stack([torch.zeros(count, dtype=torch.long), row, col]) + next_id)
                next_id += side
            else:
                ids.append(torch.arange(next_id, next_id + count).expand(3, -1))
                next_id += count
        words = length - sum(part.shape[1] for part in ids)
        ids.append(torch.arange(next_id, next_id + words).expand(3, -1))
        return torch.cat(ids, dim=1)[:, None]

    def rotary(self, position_ids_3BS: torch.Tensor | None) -> Rotary | None:
        """The M-RoPE tables of these position ids (None with learned positions)."""
        if self.config.positions != "mrope":
            return None
        if position_ids_3BS is None:
            raise ValueError("a model with M-RoPE positions needs the position ids (MoEVLM.sequence gives them)")
        return multimodal_rotary(position_ids_3BS, self.config.dim // self.config.num_heads)

    # ------------------------------------------------------------------------------------------ training

    def run_blocks(self, x_BSD, modality_BS, caches: list[KVCache] | None = None,
                   position_ids_3BS: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder over ``x``; ``position_ids`` (from :meth:`sequence`) are needed with M-RoPE."""
        rotary = self.rotary(position_ids_3BS)
        for i, block in enumerate(self.blocks):
            x_BSD = block(x_BSD, modality_BS, None if caches is None else caches[i], rotary)
        return self.norm(x_BSD)

    def training_loss(self, images: torch.Tensor | None, audio: torch.Tensor | None, prompts: Sequence[str],
                      answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy of the answer words and ``<eos>``, given the media and the prompt; the routed layers'
        weighted aux losses)."""
        prompt_ids = [self.encode_prompt(p) + [self.special_id(SEP)] for p in prompts]
        answer_ids = [self.encode_answer(a) for a in answers]
        x, modality, lengths, positions = self.sequence(images, audio, [p + a for p, a in zip(prompt_ids, answer_ids)])
        logits = self.head(self.run_blocks(x, modality, position_ids_3BS=positions))
        targets = torch.full(modality.shape, -100, dtype=torch.long, device=logits.device)
        for b, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            first = int(lengths[b]) - len(a)  # the answer's first position; predicted from the one before
            targets[b, first - 1: first - 1 + len(a)] = torch.as_tensor(a, device=logits.device)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return loss, self.aux_loss()

    def aux_loss(self) -> torch.Tensor:
        return total_aux_loss(self)

    # ------------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, images: torch.Tensor | None, audio: torch.Tensor | None, prompts: Sequence[str], *,
                 max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 generator: torch.Generator | None = None, return_routing: bool = False) -> GenerationOutput:
        """Answer each prompt about its image / sound: greedy (or sampled at ``temperature``) words until
        ``<eos>``, with a KV cache per layer. Rows are decoded in groups of equal prompt length (no padding, so a
        row's answer does not depend on the others beyond the routed layers' batch-level capacity)."""
        max_new = self.config.max_answer_tokens + 1 if max_new_tokens is None else max_new_tokens
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature}")
        if not prompts:
            raise ValueError("no prompts given: one prompt per image / sound is needed")
        for name, media in (("images", images), ("sounds", audio)):
            if media is not None and len(media) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(media)} {name}: one of each per prompt")
        prompt_ids = [self.encode_prompt(p) + [self.special_id(SEP)] for p in prompts]
        out_ids: list[list[int]] = [[] for _ in prompts]
        routing = [[None] * len(prompts) for _ in self.blocks] if return_routing else None
        modality_rows: list[torch.Tensor | None] = [None] * len(prompts)
        for length in sorted({len(p) for p in prompt_ids}):
            rows = [b for b, p in enumerate(prompt_ids) if len(p) == length]
            pick = torch.tensor(rows)
            group = self._generate_group(None if images is None else images[pick], None if audio is None else audio[pick],
                                         [prompt_ids[b] for b in rows], max_new, do_sample, temperature, generator,
                                         return_routing)
            for i, b in enumerate(rows):
                out_ids[b] = group[0][i]
                modality_rows[b] = group[2][i]
                if return_routing:
                    for layer in range(len(self.blocks)):
                        routing[layer][b] = None if group[1][layer] is None else group[1][layer][i]
        text = [self.vocab.decode(ids) for ids in out_ids]
        return GenerationOutput(text, out_ids, routing, modality_rows if return_routing else None)

    def _generate_group(self, images, audio, prompt_ids, max_new, do_sample, temperature, generator, return_routing):
        x, modality, _, positions = self.sequence(images, audio, prompt_ids)
        B, S = modality.shape
        caches = [KVCache() for _ in self.blocks]
        steps_routing: list[list[torch.Tensor | None]] = []
        hidden = self.run_blocks(x, modality, caches, positions)
        next_id = int(positions[0, 0, -1]) + 1
        if return_routing:
            steps_routing.append(self._layer_experts(modality))
        eos = self.special_id(EOS)
        done = torch.zeros(B, dtype=torch.bool)
        out = [[] for _ in range(B)]
        all_modality = [modality]
        for step in range(max_new):
            logits = self.head(hidden[:, -1]).float()
            logits[:, [self.special_id(PAD), self.special_id(BOS), self.special_id(SEP)]] = float("-inf")
            if do_sample:
                token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(-1)
            for b in range(B):
                if not done[b] and int(token[b]) != eos:
                    out[b].append(int(token[b]))
            done |= token.cpu() == eos
            if bool(done.all()) or step == max_new - 1 or S + step + 1 > self.max_positions:
                break
            position = S + step
            new_modality = torch.full((B, 1), TEXT, dtype=torch.long, device=modality.device)
            x_new = self.embed(token[:, None])
            if self.pos_embed is not None:
                x_new = x_new + self.pos_embed[position: position + 1]
            new_ids = torch.full((3, 1, 1), next_id + step, dtype=torch.long, device=modality.device)
            hidden = self.run_blocks(x_new, new_modality, caches, new_ids)
            all_modality.append(new_modality)
            if return_routing:
                steps_routing.append(self._layer_experts(new_modality))
        layers = None
        if return_routing:
            layers = []
            for layer in range(len(self.blocks)):
                parts = [step[layer] for step in steps_routing]
                layers.append(None if parts[0] is None else torch.cat(parts, dim=1))
        modality_all = torch.cat(all_modality, dim=1)
        return out, layers, list(modality_all.cpu())

    def _layer_experts(self, modality_BS: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the experts of the last forward's tokens ``[B, S, k]`` (MoT: the modality; dense: None)."""
        experts = []
        for block in self.blocks:
            if isinstance(block.ffn, RoutedBlock) and block.ffn.routing is not None:
                record = block.ffn.routing
                experts.append(record.ids_TK.reshape(*modality_BS.shape, -1).cpu())
            elif isinstance(block.ffn, ModalityUntiedFeedForward):
                experts.append(modality_BS[..., None].cpu())
            else:
                experts.append(None)
        return experts

    def expert_groups(self, layer: int) -> list[str] | None:
        """The group of every expert of ``layer``'s FFN, by name: "image intra" / "shared" (MoIIE), "text group"
        (MoMa), "e0", "e1", ... (MoE-LLaVA), the modality (MoT's untied FFNs); None for a dense FFN."""
        ffn = self.blocks[layer].ffn
        if isinstance(ffn, ModalityUntiedFeedForward):
            return list(MODALITIES)
        if not isinstance(ffn, RoutedBlock):
            return None
        if ffn.expert_names is None:
            return ffn.expert_labels()
        names = list(ffn.expert_names)
        for m, modality in enumerate(MODALITIES):  # the layers call modality m "m<m>"
            names = [n.replace(f"m{m} ", f"{modality} ") for n in names]
        return names + ffn.special_labels()

    # ------------------------------------------------------------------------------------------ upcycling

    @classmethod
    def upcycle(cls, dense: "MoEVLM", ffn: str, **overrides) -> "MoEVLM":
        """A model of layout ``ffn`` from a trained dense one: everything but the FFNs copied; the FFNs become
        expert copies (MoE-LLaVA, MoIIE, MoMa), per-modality copies of the attention and FFN (MoT), or a wider
        dense FFN (``ffn="dense"`` with a larger ``ffn_hidden``). ``overrides``: other config fields of the new
        model (``ffn_hidden``, ``num_experts``, ...; the experts' width is the dense FFN's)."""
        if dense.config.ffn != "dense":
            raise ValueError(f"upcycle starts from a dense model, got ffn={dense.config.ffn!r}")
        base = dense.config.ffn_hidden
        config = replace(dense.config, ffn=ffn, **{"expert_hidden": base, **overrides})
        if ffn == "dense" and config.ffn_hidden % base:
            raise ValueError(f"a widened dense FFN must be a multiple of the dense {base} units wide, got {config.ffn_hidden}")
        if ffn == "mot" and config.ffn_hidden % base:
            raise ValueError(f"MoT's FFNs start as the dense FFN widened: ffn_hidden must be a multiple of {base}")
        model = cls(config).to(dense.embed.weight.dtype)
        own = {k: v for k, v in dense.state_dict().items() if not k.startswith("blocks.")}
        missing = model.load_state_dict(own, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"upcycle: keys the new model lacks: {missing.unexpected_keys[:5]}")
        for block, dense_block in zip(model.blocks, dense.blocks):
            _upcycle_block(block, dense_block, config)
        return model

    def num_parameters(self, active: bool = False) -> int:
        """Parameters of the language model's blocks (the part whose layout differs), all or per token
        (``active``: routed layers count ``top_k`` experts, MoT one modality's weights)."""
        total = 0
        for block in self.blocks:
            params = sum(p.numel() for p in block.parameters())
            if active:
                params -= _inactive_parameters(block)
            total += params
        return total


def _merge_patches(tokens_BNC: torch.Tensor, m: int) -> torch.Tensor:
    """``[B, g*g, C]`` (row-major grid) -> ``[B, (g/m)^2, m*m*C]``: each ``m x m`` block's features concatenated."""
    B, N, C = tokens_BNC.shape
    g = math.isqrt(N)
    x = tokens_BNC.view(B, g // m, m, g // m, m, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (g // m) ** 2, m * m * C)


def _upcycle_block(block: DecoderBlock, dense_block: DecoderBlock, config: MoEVLMConfig) -> None:
    with torch.no_grad():
        if block.untied:  # MoT: every modality starts as the dense attention, norms and (widened) FFN
            factor = config.ffn_hidden // dense_block.ffn.up_proj.out_features
            wide = widen(dense_block.ffn, factor)
            for m in range(len(MODALITIES)):
                block.attn.qkv[m].weight.copy_(dense_block.attn.qkv.weight)
                block.attn.proj[m].weight.copy_(dense_block.attn.proj.weight)
                if config.qk_norm:
                    block.attn.q_norm[m].weight.copy_(dense_block.attn.q_norm.weight)
                    block.attn.k_norm[m].weight.copy_(dense_block.attn.k_norm.weight)
                block.attn.out_norm[m].weight.copy_(dense_block.attn_norm.weight)
                block.ffn.ffn[m].load_state_dict(wide.state_dict())
                block.ffn.out_norm[m].weight.copy_(dense_block.ffn_norm.weight)
            return
        block.attn.load_state_dict(dense_block.attn.state_dict())
        block.attn_norm.load_state_dict(dense_block.attn_norm.state_dict())
        block.ffn_norm.load_state_dict(dense_block.ffn_norm.state_dict())
        if isinstance(block.ffn, GatedMLP):
            factor = block.ffn.up_proj.out_features // dense_block.ffn.up_proj.out_features
            block.ffn.load_state_dict(widen(dense_block.ffn, factor).state_dict())
        else:  # MoE-LLaVA, MoIIE, MoMa: every expert a copy of the dense FFN (the routers stay as built)
            experts = expert_weights(dense_block.ffn, block.ffn.num_experts, "copy")
            block.ffn.w_in.copy_(experts.w_in)
            block.ffn.w_out.copy_(experts.w_out)


def _inactive_parameters(block: DecoderBlock) -> int:
    ffn = block.ffn
    if block.untied:  # one modality's attention and FFN of M
        per_modality = (sum(p.numel() for p in block.attn.parameters()) + sum(p.numel() for p in ffn.parameters()))
        return per_modality * (len(MODALITIES) - 1) // len(MODALITIES)
    if isinstance(ffn, (MoE, IntraInterMoE, ModalityGroupMoE)):
        per_expert = ffn.w_in[0].numel() + ffn.w_out[0].numel()
        inactive = int((ffn.num_experts - ffn.top_k) * per_expert)  # MoMa's top_k is an average, maybe fractional
        if isinstance(ffn, IntraInterMoE):  # a token sees its own router only
            inactive += sum(p.numel() for p in ffn.routers.parameters()) * (len(MODALITIES) - 1) // len(MODALITIES)
        return inactive
    return 0


# ----------------------------------------------------------------------------------------------------------
# Entrypoints
# ----------------------------------------------------------------------------------------------------------

# The words of moezoo.training.datasets.scenes' questions and captions and of the sound questions.
SCENE_WORDS = (
    "a", "an", "and", "are", "blue", "bottommost", "circle", "circles", "closest", "colour", "describe", "eight",
    "five", "four", "from", "furthest", "gray", "green", "how", "is", "leftmost", "left", "many", "nine", "no",
    "object", "objects", "of", "one", "orange", "picture", "red", "rightmost", "seven", "shape", "six", "square",
    "squares", "the", "there", "this", "three", "to", "topmost", "triangle", "triangles", "two", "what", "which",
    "yellow", "yes", "zero", "note", "word",
)
SOUND_WORDS = ("up", "down", "right", "on", "off", "stop", "go", "sound", "sine", "sawtooth", "plucked")
NOTE_WORDS = tuple(f"{p}{o}" for o in (3, 4) for p in ("c", "c#", "d", "d#", "e", "f", "f#", "g", "g#", "a", "a#", "b"))
VOCABULARY = SCENE_WORDS + SOUND_WORDS + NOTE_WORDS


def _create(base: MoEVLMConfig, **kwargs) -> MoEVLM:
    known = set(MoEVLMConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown MoE-VLM argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return MoEVLM(replace(base, **kwargs))


_TINY = MoEVLMConfig(vocabulary=VOCABULARY, qk_norm=True)
_TEST = MoEVLMConfig(vocabulary=VOCABULARY, image_encoder_args=dict(embed_dim=32, depth=1, num_heads=2),
                     audio_dim=16, audio_depth=1, dim=32, depth=2, num_heads=2, ffn_hidden=32, expert_hidden=32,
                     max_answer_tokens=20)


@register_model
def test_moe_vlm(pretrained: bool = False, **kwargs) -> MoEVLM:
    """A tiny MoE-VLM for CI: D=32, 2 layers, a 1-block 32-wide ViT and a 1-block audio encoder."""
    return _create(_TEST, **kwargs)


_TINY_METADATA = dict(
    data="Sort-of-CLEVR-style scenes (moezoo.training.datasets.scenes; the colour-shape pairs red triangle, blue "
         "circle and yellow square never in training) and sound questions on eSpeak NG words and synthesised "
         "notes (moezoo.training.datasets.audio), made here",
    training="training/configs/moe_vlm_*.yaml on one CPU thread each: encoders (1600 steps, 10 min), the LM on "
             "text with QK-norm (4000, 10 min), connector alignment (1000, 6 min), dense tuning (3000 + 3000, "
             "14 + 18 min), MoIIE upcycled from it (1000 steps, 9 min; seed 1): about 67 min in all",
    image_size=64,
    sampling_rate=16_000,
    paper="MoIIE, arXiv 2508.09779 (layout); LLaVA / MoE-LLaVA (stages)",
    scores="bench/mllm_compare.py (README, 'Measured'): shape 1.00, colour of an extreme object 0.92, count 1.00, "
           "relation 0.67, existence 1.00, caption F1 1.00, words 0.99, notes 1.00 on test scenes and sounds",
)


@register_model(pretrained_cfgs={
    "scenes": PretrainedCfg(
        file="moe_vlm_tiny.safetensors",  # runs/moe_vlm_moiie_s1/export in fp16, 7.0 MB
        sha256="9b2182d92f05aab8ebbb446528c7e2fe928c2710631829267302540758682b53",
        model_args={"ffn": "moiie"},
        metadata=_TINY_METADATA,
    ),
})
def moe_vlm_tiny(pretrained: bool = False, **kwargs) -> MoEVLM:
    """Questions about 64 x 64 scenes and 1 s sounds: our ViT (64 px, patches of 8, 128 wide, 4 blocks) and a
    2-block audio encoder, MLP connectors, a 4-layer D=128 decoder with QK-norm; ``ffn`` picks the layout (the bundled
    weights: MoIIE, 1 intra-modality expert per modality + 2 shared per layer)."""
    return _create(_TINY, **kwargs)


def config_dict(config: MoEVLMConfig) -> dict:
    """The config as JSON-able fields (tuples as lists) for export."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
