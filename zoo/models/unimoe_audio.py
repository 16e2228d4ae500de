"""UniMoE-Audio: "UniMoE-Audio: Unified Speech and Music Generation with Dynamic-Capacity MoE" (arXiv 2510.13344;
official code HITsz-TMG/Uni-MoE, folder UniMoE-Audio) — at a size this CPU trains.

A decoder-only transformer over audio tokens with a text prompt prefix. The audio is a grid of codes ``[Q, T]``
from a residual-VQ tokenizer (Q codebooks per frame; the official model uses DAC's 12); each position of the
sequence carries one frame of Q codes, embedded as the sum of Q per-codebook embeddings, and Q heads predict
the next frame's codes together. The codebooks are shifted by a delay pattern (codebook q lags q steps, as
MusicGen; the official pattern is [0, 8, 9, ..., 18]) so that when codebook q of frame t is predicted, the
coarser codebooks of that frame are already in the context::

    sequence = [text tokens, padded to max_text_tokens] [BOS frame] [delayed frames 0 .. T + Q - 2]
    loss     = sum over codebooks of the cross-entropy at the positions the delay pattern fills (+ aux losses)

Every FFN is the dynamic-capacity MoE (:class:`moezoo.zoo.layers.dcmoe.DynamicCapacityMoE`: top-p routing over
routed + null experts, gated shared experts) or, for the dense proto-experts and baselines, a SwiGLU
(``ffn="dense"``). Classifier-free guidance: training replaces the prompt by the null prompt (all padding) with
probability ``text_dropout_prob``; sampling mixes ``uncond + s (cond - uncond)`` logits. Generation decodes one
frame at a time with a KV cache.

What the official model has and this one does not: a pretrained LLM backbone (Qwen2.5-VL-sized) and its text
tokenizer — ours is a word-level vocabulary of the prompts (``config.vocabulary``), and learned absolute
positions instead of RoPE; DAC — ours is a small mel RVQ tokenizer plus a mel vocoder trained here, owned by the
model (``model.codec``, ``model.vocoder``) so one file holds everything that turns a prompt into sound.

In this file: :class:`UniMoEAudioConfig`, the delay pattern, the model :class:`UniMoEAudio` (training loss,
generation), and the registered entrypoints at the bottom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.encoders.words import WordVocabulary, split_words
from moezoo.kernels.experts import BACKENDS
from moezoo.zoo.config import check_choice, check_config_types, check_positive
from moezoo.zoo.layers.blocks import CausalSelfAttention, GatedMLP, KVCache
from moezoo.zoo.layers.dcmoe import DynamicCapacityMoE
from moezoo.zoo.layers.routed import routed_blocks, total_aux_loss
from moezoo.zoo.registry import PretrainedCfg, register_model

__all__ = ["UniMoEAudioConfig", "UniMoEAudio", "delay_codes", "undelay_codes", "FFN_KINDS"]

FFN_KINDS = ("dcmoe", "dense")
UNKNOWN_WORD = "<unk>"
NULL_TEXT = "<null>"


@dataclass
class UniMoEAudioConfig:
    """Everything that defines a UniMoE-Audio architecture.

    Attributes:
        num_codebooks: Q, codes per audio frame (the tokenizer's residual stages).
        codebook_size: K, codes per codebook.
        max_frames: the longest clip in frames the model is built for (its position table).
        vocabulary: the prompt words it knows (lower case); other words become ``<unk>``.
        max_text_tokens: prompt length in words (longer prompts are an error, shorter ones padded).
        dim, depth, num_heads: width, blocks, attention heads.
        ffn: "dcmoe" (dynamic-capacity MoE) or "dense" (one SwiGLU of width ``dense_hidden``).
        dense_hidden: the dense FFN's hidden width.
        num_experts, num_null_experts, num_shared_experts: the DCMoE's routed, null and shared experts
            (paper: 8, 1, 2).
        expert_hidden, shared_hidden: a routed and a shared expert's hidden width (paper: shared = half).
        top_p: the routing's probability mass (paper 0.7).
        aux_loss_coef: the balance loss weight at the start of training (annealed to ``aux_loss_coef_end``
            by the training module; the paper: 0.025 -> 0.001 over 10k steps), averaged over layers.
        router_jitter, input_jitter: the DCMoE's jitter in training (paper 0.01).
        text_dropout_prob: probability of training on the null prompt (classifier-free guidance).
        backend: the routed experts' compute backend.
        codec, vocoder: the configs (``MelTokenizerConfig`` / ``MelVocoderConfig`` fields) of the tokenizer
            (``moezoo.encoders.audio.MelTokenizer``) and the vocoder (``MelVocoder``) the model owns; the model
            predicts the tokenizer's first ``num_codebooks`` codebooks (None: no codec / vocoder; generation then
            returns codes only).
    """

    num_codebooks: int = 4
    codebook_size: int = 256
    max_frames: int = 64
    vocabulary: tuple[str, ...] = ()
    max_text_tokens: int = 8
    dim: int = 192
    depth: int = 6
    num_heads: int = 4
    ffn: str = "dcmoe"
    dense_hidden: int = 768
    num_experts: int = 8
    num_null_experts: int = 1
    num_shared_experts: int = 2
    expert_hidden: int = 192
    shared_hidden: int = 96
    top_p: float = 0.7
    aux_loss_coef: float = 0.025
    aux_loss_coef_end: float = 0.001
    router_jitter: float = 0.01
    input_jitter: float = 0.01
    text_dropout_prob: float = 0.1
    backend: str = "auto"
    codec: dict | None = None
    vocoder: dict | None = None

    def __post_init__(self):
        check_config_types(self)
        check_positive(self, ("num_codebooks", "codebook_size", "max_frames", "max_text_tokens", "dim", "depth",
                              "num_heads", "dense_hidden", "num_experts", "expert_hidden"))
        check_positive(self, ("num_null_experts", "num_shared_experts", "shared_hidden"), least=0)
        check_choice(self, "ffn", FFN_KINDS)
        check_choice(self, "backend", BACKENDS)
        if self.dim % self.num_heads:
            raise ValueError(f"UniMoEAudioConfig.dim ({self.dim}) must be a multiple of num_heads ({self.num_heads})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"UniMoEAudioConfig.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.text_dropout_prob <= 1.0:
            raise ValueError(f"UniMoEAudioConfig.text_dropout_prob must be in [0, 1], got {self.text_dropout_prob}")
        words = tuple(w.lower() for w in self.vocabulary)
        try:
            WordVocabulary(words)
        except ValueError as err:
            raise ValueError(f"UniMoEAudioConfig.vocabulary: {err}") from None
        self.vocabulary = words

    @property
    def pad_code(self) -> int:
        """The id of "no code here" (the delay pattern's gaps), after the K real codes."""
        return self.codebook_size

    @property
    def bos_code(self) -> int:
        return self.codebook_size + 1

    @property
    def text_vocab_size(self) -> int:
        """Words + ``<unk>`` + the padding id (the null prompt is all padding)."""
        return len(self.vocabulary) + 2

    @property
    def max_positions(self) -> int:
        return self.max_text_tokens + 1 + self.max_frames + self.num_codebooks - 1


# ----------------------------------------------------------------------------------------------------------
# The delay pattern
# ----------------------------------------------------------------------------------------------------------


def delay_codes(codes_BQT: torch.Tensor, pad: int) -> torch.Tensor:
    """``[B, Q, T]`` codes -> ``[B, Q, T + Q - 1]`` with codebook q shifted right by q steps and the gaps set
    to ``pad``: step s holds codebook q of frame ``s - q``."""
    B, Q, T = codes_BQT.shape
    out = codes_BQT.new_full((B, Q, T + Q - 1), pad)
    for q in range(Q):
        out[:, q, q:q + T] = codes_BQT[:, q]
    return out


def undelay_codes(delayed_BQS: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`delay_codes`: ``[B, Q, S]`` -> ``[B, Q, S - Q + 1]``."""
    B, Q, S = delayed_BQS.shape
    T = S - Q + 1
    if T < 1:
        raise ValueError(f"{S} delayed steps hold no whole frame of {Q} codebooks")
    return torch.stack([delayed_BQS[:, q, q:q + T] for q in range(Q)], dim=1)


def delay_mask(num_codebooks: int, num_frames: int, device=None) -> torch.Tensor:
    """bool ``[Q, T + Q - 1]``: where the delay pattern holds a real code."""
    steps = torch.arange(num_frames + num_codebooks - 1, device=device)
    lag = torch.arange(num_codebooks, device=device)[:, None]
    return (steps >= lag) & (steps < lag + num_frames)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


class DecoderBlock(nn.Module):
    """Pre-norm causal attention + FFN (DCMoE or dense SwiGLU), both residual."""

    def __init__(self, cfg: UniMoEAudioConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.dim)
        if cfg.ffn == "dense":
            self.mlp = GatedMLP(cfg.dim, cfg.dense_hidden)
        else:
            # coefficient / depth: the sum total_aux_loss takes is the official average over layers
            self.moe = DynamicCapacityMoE(
                cfg.dim, cfg.expert_hidden, cfg.num_experts, num_null_experts=cfg.num_null_experts,
                num_shared_experts=cfg.num_shared_experts, shared_hidden_dim=cfg.shared_hidden, top_p=cfg.top_p,
                router_jitter=cfg.router_jitter, input_jitter=cfg.input_jitter,
                aux_loss_coef=cfg.aux_loss_coef / cfg.depth, backend=cfg.backend,
            )

    @property
    def ffn(self) -> nn.Module:
        return self.mlp if hasattr(self, "mlp") else self.moe

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD), cache)
        return x_BSD + self.ffn(self.norm2(x_BSD))


class UniMoEAudio(nn.Module):
    """Text prompt -> audio codes: ``forward(text_ids [B, L], codes_in [B, Q, S]) -> logits [B, Q, S, K]``
    for the S audio positions (teacher forcing on delayed codes); :meth:`training_loss` and :meth:`generate`
    are what training and the pipeline call."""

    def __init__(self, config: UniMoEAudioConfig):
        super().__init__()
        self.config = cfg = config
        Q, K, D = cfg.num_codebooks, cfg.codebook_size, cfg.dim
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, D)
        self.code_embeddings = nn.ModuleList(nn.Embedding(K + 2, D) for _ in range(Q))  # codes, pad, bos
        self.position_embedding = nn.Parameter(torch.zeros(cfg.max_positions, D))
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D)
        self.heads = nn.ModuleList(nn.Linear(D, K, bias=False) for _ in range(Q))
        self.codec = self.vocoder = None
        if cfg.codec is not None or cfg.vocoder is not None:
            from moezoo.encoders import audio  # torchaudio: imported only by models that own a codec

            self.codec = audio.MelTokenizer(cfg.codec) if cfg.codec is not None else None
            self.vocoder = audio.MelVocoder(cfg.vocoder) if cfg.vocoder is not None else None
            # the tokenizer was trained with quantiser dropout: its first Q codebooks alone decode to a coarser mel
            if self.codec is not None and (self.codec.num_codebooks < Q or self.codec.codebook_size != K):
                raise ValueError(f"the codec makes {self.codec.num_codebooks} codebooks of {self.codec.codebook_size} "
                                 f"codes; the model predicts the first {Q} of {K} codes")
        # the prompt vocabulary: the config's words, <unk>, then the null id (padding; the dropped prompt)
        self.words = WordVocabulary(cfg.vocabulary, (NULL_TEXT,))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) embeddings and linear maps, zero biases; the codec and vocoder keep theirs."""
        for name, module in self.named_modules():
            if name.startswith(("codec", "vocoder")):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.position_embedding, std=0.02)

    # ------------------------------------------------------------------------------------------ prompts

    @property
    def null_text_id(self) -> int:
        return self.words.special_id(NULL_TEXT)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> word ids ``[B, max_text_tokens]``, padded with the null id. Words outside the vocabulary
        become ``<unk>``; a prompt longer than ``max_text_tokens`` words is an error."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        L = self.config.max_text_tokens
        rows = []
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"a prompt must be a non-empty string, got {prompt!r}")
            count = len(split_words(prompt))
            if count > L:
                raise ValueError(f"prompt {prompt!r} has {count} words; this model reads at most {L}")
            rows.append(self.words.encode(prompt, L, pad=NULL_TEXT))
        return torch.tensor(rows, dtype=torch.long, device=self.position_embedding.device)

    def unknown_words(self, prompt: str) -> list[str]:
        return self.words.unknown_words(prompt)

    # ------------------------------------------------------------------------------------------ forward

    def embed(self, text_ids_BL: torch.Tensor | None, codes_BQS: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of the text prefix (if given) followed by the code frames, positions from ``start``."""
        parts = [] if text_ids_BL is None else [self.text_embedding(text_ids_BL)]
        parts.append(sum(table(codes_BQS[:, q]) for q, table in enumerate(self.code_embeddings)))
        x_BSD = torch.cat(parts, dim=1)
        end = start + x_BSD.shape[1]
        if end > self.config.max_positions:
            raise ValueError(f"{end} positions; this model holds {self.config.max_positions} "
                             f"({self.config.max_frames} frames)")
        return x_BSD + self.position_embedding[start:end]

    def run_blocks(self, x_BSD: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x_BSD = block(x_BSD, None if caches is None else caches[i])
        return self.norm(x_BSD)

    def logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(h_BSD) for head in self.heads], dim=1)  # [B, Q, S, K]

    def forward(self, text_ids: torch.Tensor, codes_in: torch.Tensor) -> torch.Tensor:
        L = text_ids.shape[1]
        if L != self.config.max_text_tokens:
            raise ValueError(f"text_ids must be [B, {self.config.max_text_tokens}], got {tuple(text_ids.shape)}")
        h_BSD = self.run_blocks(self.embed(text_ids, codes_in, 0))
        return self.logits(h_BSD[:, L:])

    def aux_loss(self) -> torch.Tensor:
        return total_aux_loss(self).to(self.position_embedding.device)

    # ------------------------------------------------------------------------------------------ training

    def training_loss(self, text_ids: torch.Tensor, codes: torch.Tensor, generator: torch.Generator | None = None,
                      text_dropout_prob: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes_loss, aux_loss)`` for prompts ``text_ids [B, L]`` and clips ``codes [B, Q, T]``: the
        cross-entropy of every code the delay pattern places, averaged per codebook and summed over codebooks
        (the official loss); the prompt is dropped to the null prompt with probability ``text_dropout_prob``
        (default: the config's; 0 for a validation loss of the conditional model)."""
        cfg = self.config
        B, Q, T = codes.shape
        if Q != cfg.num_codebooks or T > cfg.max_frames:
            raise ValueError(f"codes must be [B, {cfg.num_codebooks}, <= {cfg.max_frames}], got {tuple(codes.shape)}")
        dropout = cfg.text_dropout_prob if text_dropout_prob is None else text_dropout_prob
        if dropout > 0:
            device = generator.device if generator is not None else text_ids.device
            drop_B = torch.rand(B, generator=generator, device=device).to(text_ids.device) < dropout
            text_ids = text_ids.masked_fill(drop_B[:, None], self.null_text_id)
        target_BQS = delay_codes(codes, cfg.pad_code)
        bos = target_BQS.new_full((B, Q, 1), cfg.bos_code)
        logits_BQSK = self(text_ids, torch.cat([bos, target_BQS[:, :, :-1]], dim=2))
        placed_QS = delay_mask(Q, T, codes.device)
        per_codebook = [F.cross_entropy(logits_BQSK[:, q][:, placed_QS[q]].reshape(-1, cfg.codebook_size),
                                        target_BQS[:, q][:, placed_QS[q]].reshape(-1)) for q in range(Q)]
        return torch.stack(per_codebook).sum(), self.aux_loss()

    # ------------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, text_ids: torch.Tensor, num_frames: int, *, guidance_scale: float = 1.0,
                 temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 return_routing: bool = False):
        """Sample ``[B, Q, num_frames]`` codes for prompts ``text_ids [B, L]``, one frame per step with a KV
        cache. ``guidance_scale != 1`` runs the null prompt alongside (classifier-free guidance on the
        logits). ``generator``: one, or one per prompt (each prompt's codes then depend on its own seed only).

        With ``return_routing``, also a list over routed layers of int ``[B, num_frames + Q - 1]``: how many
        experts (null experts included) each generated step used, conditional branch."""
        cfg = self.config
        B, Q = text_ids.shape[0], cfg.num_codebooks
        if not 1 <= num_frames <= cfg.max_frames:
            raise ValueError(f"num_frames must be in [1, {cfg.max_frames}], got {num_frames}")
        guided = guidance_scale != 1.0
        if guided:
            text_ids = torch.cat([text_ids, torch.full_like(text_ids, self.null_text_id)])
        rows = text_ids.shape[0]
        caches = [KVCache() for _ in self.blocks]
        frame_BQ1 = text_ids.new_full((rows, Q, 1), cfg.bos_code)
        placed_QS = delay_mask(Q, num_frames, text_ids.device)
        steps, used = [], []
        x_BSD = self.embed(text_ids, frame_BQ1, 0)
        for s in range(num_frames + Q - 1):
            h_BD = self.run_blocks(x_BSD, caches)[:, -1]
            logits_BQK = self.logits(h_BD[:, None])[:, :, 0].float()
            if guided:
                cond, uncond = logits_BQK[:B], logits_BQK[B:]
                logits_BQK = uncond + guidance_scale * (cond - uncond)
            codes_BQ = _sample(logits_BQK, temperature, top_k, generator)
            codes_BQ = torch.where(placed_QS[:, s], codes_BQ, torch.full_like(codes_BQ, cfg.pad_code))
            steps.append(codes_BQ)
            if return_routing:
                used.append([block.experts_per_token().reshape(rows, -1)[:B, -1] for _, block in routed_blocks(self)])
            frame_BQ1 = codes_BQ.repeat(2, 1)[:, :, None] if guided else codes_BQ[:, :, None]
            x_BSD = self.embed(None, frame_BQ1, cfg.max_text_tokens + 1 + s)
        codes_BQT = undelay_codes(torch.stack(steps, dim=2))
        if not return_routing:
            return codes_BQT
        per_layer = [torch.stack([step[i] for step in used], dim=1) for i in range(len(used[0]))] if used else []
        return codes_BQT, per_layer

    def encode_audio(self, audio_BN: torch.Tensor) -> torch.Tensor:
        """Waveforms (16 kHz) -> the codes the model predicts ``[B, Q, T]``: the codec's first Q codebooks."""
        if self.codec is None:
            raise ValueError("this model owns no codec (config.codec is None)")
        return self.codec.encode(audio_BN, num_codebooks=self.config.num_codebooks)

    def decode_audio(self, codes_BQT: torch.Tensor) -> torch.Tensor:
        """Codes -> waveforms ``[B, samples]`` through the model's own codec and vocoder."""
        if self.codec is None or self.vocoder is None:
            raise ValueError("this model owns no codec/vocoder (config.codec / config.vocoder are None)")
        return self.vocoder(self.codec.decode(codes_BQT))

    # ------------------------------------------------------------------------------------------ stage 2

    @classmethod
    def from_dense_protos(cls, protos: Sequence["UniMoEAudio"], **overrides) -> "UniMoEAudio":
        """The paper's stage 2: a DCMoE model assembled from dense proto-experts of one architecture (one per
        domain). Every weight outside the FFNs (embeddings, attention, norms, heads) is the protos' average;
        each block's routed experts are the protos' dense FFNs split into equal slices (the first proto's slices
        first), so that, before training, the sum of each proto's experts is that proto's FFN; gates and shared
        experts are new. The codec and vocoder are the first proto's. ``overrides``: DCMoE config fields
        (``num_null_experts``, ``top_p``...); ``num_experts`` must be a multiple of the number of protos."""
        from moezoo.zoo.upcycle import average_state_dicts, moe_from_dense

        protos = list(protos)
        if not protos or any(not isinstance(p, UniMoEAudio) or p.config.ffn != "dense" for p in protos):
            raise ValueError("from_dense_protos takes one or more dense UniMoEAudio models (ffn='dense')")
        if any(p.config != protos[0].config for p in protos[1:]):
            raise ValueError("the protos must share one architecture (equal configs)")
        base = protos[0].config
        num_experts = overrides.pop("num_experts", base.num_experts)
        if num_experts % len(protos) or base.dense_hidden % (num_experts // len(protos)):
            raise ValueError(f"{num_experts} experts cannot be {len(protos)} protos' FFNs of width {base.dense_hidden} "
                             "cut into equal slices")
        expert_hidden = base.dense_hidden // (num_experts // len(protos))
        model = cls(replace(base, ffn="dcmoe", num_experts=num_experts, expert_hidden=expert_hidden, **overrides))
        outside_ffn = {k: v for k, v in average_state_dicts([p.state_dict() for p in protos]).items()
                       if ".mlp." not in k and not k.startswith(("codec.", "vocoder."))}
        outside_ffn.update({k: v for k, v in protos[0].state_dict().items() if k.startswith(("codec.", "vocoder."))})
        missing = [k for k in model.load_state_dict(outside_ffn, strict=False).missing_keys if ".moe." not in k]
        if missing:
            raise RuntimeError(f"stage-2 assembly left weights unset: {missing[:5]}")
        cfg = model.config
        for i, block in enumerate(model.blocks):
            block.moe = moe_from_dense(
                [p.blocks[i].mlp for p in protos], num_experts, "split", block=DynamicCapacityMoE,
                num_null_experts=cfg.num_null_experts, num_shared_experts=cfg.num_shared_experts,
                shared_hidden_dim=cfg.shared_hidden, top_p=cfg.top_p, router_jitter=cfg.router_jitter,
                input_jitter=cfg.input_jitter, aux_loss_coef=cfg.aux_loss_coef / cfg.depth, backend=cfg.backend,
            )
        return model

    # ------------------------------------------------------------------------------------------ sizes

    def num_parameters(self, active: bool = False, *, experts_per_token: float | None = None) -> int:
        """Parameters of the language model (the codec and vocoder not counted). ``active``: those one token
        uses, with ``experts_per_token`` routed experts on average (default: ``top_p`` times the routed and
        null experts, rounded up: the most a token can use)."""
        own = [p for n, p in self.named_parameters() if not n.startswith(("codec.", "vocoder."))]
        total = sum(p.numel() for p in own)
        if not active or self.config.ffn == "dense":
            return total
        cfg = self.config
        k = experts_per_token
        if k is None:
            k = math.ceil(cfg.top_p * (cfg.num_experts + cfg.num_null_experts))
        per_expert = 3 * cfg.dim * cfg.expert_hidden
        return int(total - cfg.depth * (cfg.num_experts - min(k, cfg.num_experts)) * per_expert)


def _sample(logits_BQK: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One code per (row, codebook): greedy at temperature 0, else from the top-k softmax."""
    if temperature == 0:
        return logits_BQK.argmax(-1)
    logits_BQK = logits_BQK / temperature
    if top_k is not None and top_k < logits_BQK.shape[-1]:
        kth = logits_BQK.topk(top_k, dim=-1).values[..., -1:]
        logits_BQK = logits_BQK.masked_fill(logits_BQK < kth, float("-inf"))
    probs_BQK = logits_BQK.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p, 1, generator=g).T for p, g in zip(probs_BQK, generator)])
    B, Q, K = probs_BQK.shape
    return torch.multinomial(probs_BQK.reshape(B * Q, K), 1, generator=generator).reshape(B, Q)


# ----------------------------------------------------------------------------------------------------------
# Entrypoints
# ----------------------------------------------------------------------------------------------------------


def _create(base: UniMoEAudioConfig, **kwargs) -> UniMoEAudio:
    known = {f for f in UniMoEAudioConfig.__dataclass_fields__}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown UniMoE-Audio argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return UniMoEAudio(replace(base, **kwargs))


# The codec and vocoder configs of the bundled model: training/configs/audio_tokenizer.yaml, audio_vocoder.yaml.
_CODEC = dict(n_mels=80, hidden_dim=128, latent_dim=64, num_blocks=3, kernel_size=3, num_codebooks=8,
              codebook_size=256, ema_decay=0.99, dead_code_threshold=0.5)
_VOCODER = dict(n_mels=80, dim=128, intermediate_dim=384, num_blocks=4, kernel_size=7, griffin_lim_iterations=64,
                max_log_magnitude=8.0)
# The words of moezoo.training.datasets.audio's captions ("the word seven", "a square C#3 note", "a A minor
# chord on a plucked string"): the bundled model's prompt vocabulary.
_CAPTION_WORDS = (
    "a", "a#3", "a#4", "a3", "a4", "b3", "b4", "c", "c#3", "c#4", "c3", "c4", "chord", "d", "d#3", "d#4", "d3", "d4",
    "down", "e", "e3", "e4", "eight", "f", "f#3", "f#4", "f3", "f4", "five", "four", "g", "g#3", "g#4", "g3", "g4",
    "go", "left", "major", "minor", "nine", "no", "note", "off", "on", "one", "plucked", "right", "sawtooth", "seven",
    "sine", "six", "square", "stop", "string", "the", "three", "two", "up", "wave", "word", "yes", "zero",
)
# 1.02 s clips: 65 frames of 16 ms; the first 4 of the tokenizer's 8 codebooks.
_TINY = UniMoEAudioConfig(num_codebooks=4, codebook_size=256, max_frames=65, vocabulary=_CAPTION_WORDS,
                          max_text_tokens=8, dim=160, depth=6, num_heads=4, dense_hidden=640, num_experts=8,
                          num_null_experts=1, num_shared_experts=2, expert_hidden=160, shared_hidden=80,
                          codec=_CODEC, vocoder=_VOCODER)
# CI: 3 codebooks of 16 codes, a codec and vocoder of a few hundred parameters.
_TEST = UniMoEAudioConfig(num_codebooks=3, codebook_size=16, max_frames=12, vocabulary=("a", "note", "the", "word"),
                          max_text_tokens=4, dim=32, depth=2, num_heads=2, dense_hidden=64, num_experts=4,
                          expert_hidden=16, shared_hidden=8,
                          codec=dict(hidden_dim=8, latent_dim=4, num_blocks=1, num_codebooks=3, codebook_size=16),
                          vocoder=dict(dim=8, intermediate_dim=16, num_blocks=1, griffin_lim_iterations=2))


@register_model
def test_unimoe_audio(pretrained: bool = False, **kwargs) -> UniMoEAudio:
    """A tiny UniMoE-Audio for CI: 3 codebooks of 16 codes, D=32, 2 layers, 4 routed + 1 null + 2 shared experts."""
    return _create(_TEST, **kwargs)


_TINY_METADATA = dict(
    data="eSpeak NG saying 20 words in 72 voices x 2 rates (the 'generator' speakers) and synthesised notes "
         "MIDI 48-71 and 12 triads in 4 timbres (moezoo.training.datasets.audio), made here",
    training="the paper's 3 stages on one CPU thread, 60 min in all: dense speech and music protos (12 + 12 min), "
             "the MoE built from them with gate and shared experts trained (8 min), everything (28 min); "
             "training/configs/unimoe_audio_*.yaml. Tokenizer (5 min) and vocoder (6 min) trained before.",
    sampling_rate=16_000,
    paper="UniMoE-Audio, arXiv 2510.13344",
    license="weights: same as moezoo; eSpeak NG voices: GPL-3.0 (the data, not the weights)",
)


@register_model(pretrained_cfgs={
    "speech_music": PretrainedCfg(
        file="unimoe_audio_tiny.safetensors",  # runs/unimoe_audio_stage3/export in fp16, 12.6 MB
        sha256="8e2ccd8832bc95c559393ee0366941bc3ef83e982cc245c027bbf4560889fa58",
        metadata=_TINY_METADATA,
    ),
})
def unimoe_audio_tiny(pretrained: bool = False, **kwargs) -> UniMoEAudio:
    """Speech (20 eSpeak words) and music (notes MIDI 48-71 and triads in 4 timbres) from a prompt: D=160, 6 layers,
    DCMoE of 8 routed + 1 null + 2 shared experts (top-p 0.7) per layer, 4 codebooks of the mel tokenizer."""
    return _create(_TINY, **kwargs)
