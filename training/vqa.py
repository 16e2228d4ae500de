"""Training the multimodal LM (:mod:`moezoo.zoo.models.moe_vlm`) in stages, as LLaVA / MoE-LLaVA / Uni-MoE do,
each stage a config in training/configs/ (``moe_vlm_*.yaml``):

0. ``moe_vlm_encoders.yaml`` (:class:`EncoderPretrainModule`): the image encoder learns which colour-shape
   pairs a scene holds and the colour under every patch; the audio encoder which word or note it hears. Our
   towers have no pretrained weights, so this stands in for CLIP / Whisper.
1. ``moe_vlm_text.yaml``: the language model alone learns the questions from the scene written out as text
   ("a red circle and a blue square. what shape is the red object?" -> "circle") — our stand-in for a
   pretrained LLM;
2. ``moe_vlm_align.yaml``: connector alignment on captions ("describe the picture." / "describe the sound."),
   encoders and language model frozen: only the connectors learn to speak the LM's language;
3. ``moe_vlm_dense.yaml``: dense tuning on the questions, LM and connectors trained, encoders frozen;
4. ``moe_vlm_<layout>.yaml``: MoE tuning, the model upcycled from stage 3's (``upcycle_from`` + ``ffn``),
   on the same data for as many steps; ``moe_vlm_dense_wide.yaml`` is the dense model at the routed models'
   active width from the same start.

Every step takes one batch of scenes and one of sounds (:class:`~moezoo.training.datamodules.scenes.
ScenesSoundsQADataModule`). Validation reports the loss and the exact-match accuracy of greedy answers per
question kind (caption attribute F1 for captions); ``moezoo-train test`` reports them on the test, held-out
pairs and unseen-speaker splits.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moezoo.encoders.audio import AudioEncoder
from moezoo.encoders.image import TINY_IMAGE_MODEL, ImageEncoder
from moezoo.zoo import create_model, save_pretrained
from moezoo.zoo.models.moe_vlm import MoEVLM, config_dict

from .common import adamw_warmup_cosine, export_when_fit_ends, log_expert_load, run_path, train_only
from .datasets.audio import WORDS, music_sounds, note_name
from .datasets.scenes import EXTREMES, SCENE_COLOURS, SHAPES, caption_f1, caption_pairs

__all__ = ["VQAModule", "EncoderPretrainModule", "answer_score"]

CAPTION_KINDS = ("caption", "sound caption")


def answer_score(kind: str, predicted: str, truth: str) -> float:
    """Exact match of the answer's words; captions score their colour-shape F1 (sound captions: exact match)."""
    if kind == "caption":
        return caption_f1(predicted, truth)
    return float(" ".join(predicted.lower().split()) == " ".join(truth.lower().split()))


class VQAModule(pl.LightningModule):
    """One stage of the multimodal LM's training (module docstring).

    Args:
        model: a registered name (``"moe_vlm_tiny"``) or ``local-dir:`` of an earlier stage's export.
        model_args: constructor overrides (``ffn``, ...); with ``upcycle_from``, :meth:`MoEVLM.upcycle`'s.
        upcycle_from: ``local-dir:`` of a dense export to upcycle to ``model_args["ffn"]``.
        image_encoder, audio_encoder: safetensors of pretrained encoders (:class:`EncoderPretrainModule`).
        trainable: glob patterns of the parameters to train (default: all but the encoders).
        text_only: stage 1: the media replaced by their captions written in the prompt.
        learning_rate, weight_decay, warmup_steps, decay_steps: AdamW, linear warm-up, cosine to 10%.
        eval_batches: validation batches answered greedily for the accuracy (per loader).
        log_expert_load_every: per-layer expert load every this many steps (0: never).
        export_dir: when fitting ends, export here (relative: inside the run's folder).
        architecture: the entrypoint the export names.
    """

    def __init__(self, model: str = "moe_vlm_tiny", model_args: dict | None = None, upcycle_from: str | None = None,
                 image_encoder: str | None = None, audio_encoder: str | None = None,
                 trainable: list[str] | None = None, text_only: bool = False, learning_rate: float = 1e-3,
                 weight_decay: float = 0.01, warmup_steps: int = 100, decay_steps: int = 3000, eval_batches: int = 4,
                 log_expert_load_every: int = 100, export_dir: str | None = None,
                 architecture: str = "moe_vlm_tiny") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name = upcycle_from or model
        args = dict(model_args or {})
        if upcycle_from:
            if "ffn" not in args:
                raise ValueError("upcycle_from needs model_args.ffn: the layout to upcycle to")
            self.model = MoEVLM.upcycle(create_model(upcycle_from, pretrained=True), **args)
        else:
            self.model = create_model(model, pretrained=model.startswith(("local-dir:", "hf-hub:")), **args)
        if not isinstance(self.model, MoEVLM):
            raise ValueError(f"{self.model_name!r} is not a MoE-VLM model")
        for path, part in ((image_encoder, self.model.image_encoder), (audio_encoder, self.model.audio_encoder)):
            if path is not None:
                if part is None:
                    raise ValueError(f"{path}: the model has no such encoder")
                part.load_state_dict(load_file(path))
        self._freeze(trainable)
        self.scores: dict[str, list[float]] = defaultdict(list)

    def _freeze(self, patterns: Sequence[str] | None) -> None:
        if patterns is not None:
            train_only(self.model, patterns, self.model_name)
            return
        for name, parameter in self.model.named_parameters():  # by default everything but the encoders
            parameter.requires_grad_(not name.startswith(("image_encoder.", "audio_encoder.")))

    def train(self, mode: bool = True) -> "VQAModule":
        """Frozen encoders stay in eval mode (no dropout or batch statistics) while the rest trains."""
        super().train(mode)
        for part in (self.model.image_encoder, self.model.audio_encoder):
            if part is not None and not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    # ------------------------------------------------------------------------------------------ batches

    @staticmethod
    def _parts(batch: dict) -> dict[str, dict]:
        """``{"image": ..., "sound": ...}`` from a combined batch, or one part from a plain one."""
        if "prompt" in batch:
            return {"image" if "image" in batch else "sound": batch}
        return {name: part for name, part in batch.items() if part is not None}

    def _inputs(self, part: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
        prompts = list(part["prompt"])
        if self.hparams.text_only:
            return None, None, [f"{caption}. {prompt}" for caption, prompt in zip(part["caption"], prompts)]
        return part.get("image"), part.get("audio"), prompts

    def training_step(self, batch, batch_idx):
        total, aux_total = 0.0, 0.0
        for name, part in self._parts(batch).items():
            images, audio, prompts = self._inputs(part)
            loss, aux = self.model.training_loss(images, audio, prompts, part["answer"])
            self.log(f"train/loss_{name}", loss, batch_size=len(prompts))
            total, aux_total = total + loss, aux_total + aux
        self.log("train/loss", total, prog_bar=True)
        self.log("train/aux_loss", aux_total)
        log_expert_load(self)
        return total + aux_total

    def _evaluate(self, part: dict, prefix: str, answer: bool) -> None:
        images, audio, prompts = self._inputs(part)
        loss, _ = self.model.training_loss(images, audio, prompts, part["answer"])
        medium = "image" if "image" in part else "sound"  # one key per loader: validation has two
        self.log(f"{prefix}/loss_{medium}", loss, prog_bar=prefix == "val", batch_size=len(prompts),
                 add_dataloader_idx=False)
        if not answer:
            return
        out = self.model.generate(images, audio, prompts)
        for kind, predicted, truth in zip(part["kind"], out.text, part["answer"]):
            self.scores[f"{prefix}/{kind}"].append(answer_score(kind, predicted, truth))

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluate(batch, "val", batch_idx < self.hparams.eval_batches)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        split = ("test", "held_out", "sounds")[dataloader_idx] if dataloader_idx < 3 else f"test{dataloader_idx}"
        self._evaluate(batch, split, True)

    def _log_scores(self) -> None:
        for name, values in sorted(self.scores.items()):
            self.log(name, sum(values) / len(values), add_dataloader_idx=False)
        self.scores.clear()

    def on_validation_epoch_end(self):
        self._log_scores()

    def on_test_epoch_end(self):
        self._log_scores()

    def configure_optimizers(self):
        return adamw_warmup_cosine([p for p in self.model.parameters() if p.requires_grad], self.hparams)

    # ------------------------------------------------------------------------------------------ export

    def on_fit_end(self):
        export_when_fit_ends(self)

    def export(self, directory, metadata: dict | None = None, dtype: torch.dtype | None = None):
        """The zoo format: ``create_model("local-dir:DIRECTORY", pretrained=True)`` loads it."""
        return save_pretrained(self.model, directory, self.hparams.architecture, config_dict(self.model.config),
                               metadata or {}, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Encoder pretraining
# ----------------------------------------------------------------------------------------------------------

PAIRS = [(c, s) for c in SCENE_COLOURS for s in SHAPES]
SOUND_LABELS = [*WORDS, *[note_name(s.midi[0]).lower() for s in music_sounds() if s.kind == "note"]]


class EncoderPretrainModule(pl.LightningModule):
    """Pretrains the multimodal LM's encoders (stage 0): the image encoder (ours or any timm name) with two heads
    on its patch tokens — the colour-shape pairs the scene holds (binary cross-entropy over the 18 pairs, from
    the mean token), and per token the colour and the shape under the patch's centre (7 and 4 classes with the
    background; the shape is the caption's for that colour, colours being distinct in a scene), and on the
    patches of an object that object's centre (x, y regressed, in patches): this keeps the tokens local, lets a
    question about one object read its own tokens, and puts where each object is into its tokens — the
    language model compares positions ("leftmost", "left of", "closest to") that two objects in one merged token
    or 2 px apart would not show otherwise; the audio encoder with a word-or-note head (20 words + 24 notes) on its mean token.
    ``centre_weight`` scales the centre's squared error (at 1 it crowded out the pairs: 27% of validation
    scenes read whole against 99.6% at 0.1).
    ``relation_weight`` > 0 adds relational targets on each object's patches: the colour-shape pair of the object
    nearest to it and of the one furthest from it (cross-entropy over the 18 pairs), and whether it is the
    leftmost, rightmost, topmost or bottommost object (binary cross-entropy). A 4-layer decoder given only each
    object's centre compared distances poorly (closest / furthest 0.73 however long it trained); the ViT's
    global attention over every patch pair learns them here (relation_weight 1.0, 2400 steps: 89% of object
    patches read both right on validation), but the decoder did not read them off the named object any better:
    after stage 3b closest / furthest 0.73 / 0.71 and "left of" 0.64 (0.95 without them), so the configs keep 0.
    Batches: ``{"image": scene QA batch, "sound": sound QA batch}`` (the captions give the pairs).
    The encoders are saved as ``image_encoder.safetensors`` / ``audio_encoder.safetensors`` in ``save_dir``
    (relative: inside the run's folder) when fitting ends."""

    def __init__(self, image_encoder: str = TINY_IMAGE_MODEL, image_layer: int = -1, image_encoder_args: dict | None = None,
                 audio_dim: int = 96, audio_depth: int = 2, learning_rate: float = 1e-3, weight_decay: float = 0.05,
                 warmup_steps: int = 100, decay_steps: int = 2000, save_dir: str = "encoders",
                 centre_weight: float = 1.0, relation_weight: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.image_encoder = ImageEncoder(image_encoder, layer=image_layer, **(image_encoder_args or {}))
        self.pair_head = nn.Linear(self.image_encoder.dim, len(PAIRS))
        self.colour_head = nn.Linear(self.image_encoder.dim, len(SCENE_COLOURS) + 1)
        self.shape_head = nn.Linear(self.image_encoder.dim, len(SHAPES) + 1)
        self.centre_head = nn.Linear(self.image_encoder.dim, 2)
        self.relation_head = nn.Linear(self.image_encoder.dim, 2 * len(PAIRS) + len(EXTREMES))
        self.audio_encoder = AudioEncoder(audio_dim, audio_depth) if audio_depth else None
        self.sound_head = nn.Linear(audio_dim, len(SOUND_LABELS)) if audio_depth else None
        self.register_buffer("palette", torch.tensor([[0, 0, 0], *SCENE_COLOURS.values()], dtype=torch.float32) / 127.5 - 1,
                             persistent=False)

    def _image_losses(self, part: dict) -> dict[str, torch.Tensor]:
        """``pair_loss``: pair presence (BCE); ``patch_loss``: colour and shape under each patch (cross-entropy)
        plus, when the batch has the scenes' ``centres``, ``centre_weight`` times the object-centre error and
        ``relation_weight`` times the relational targets' loss (and their accuracy, ``relations``);
        ``pairs_exact``: the fraction of scenes whose pairs are all read right."""
        images = part["image"]
        tokens = self.image_encoder(images)
        targets = torch.zeros(len(images), len(PAIRS), device=images.device)
        for row, caption in enumerate(part["caption"]):
            for pair in caption_pairs(caption):
                targets[row, PAIRS.index(pair)] = 1.0
        pair_logits = self.pair_head(tokens.mean(1))
        pair_loss = F.binary_cross_entropy_with_logits(pair_logits, targets)
        colours = self._patch_colours(images, tokens.shape[1])
        shapes = self._patch_shapes(colours, part["caption"])
        patch_loss = (F.cross_entropy(self.colour_head(tokens).flatten(0, 1), colours.flatten())
                      + F.cross_entropy(self.shape_head(tokens).flatten(0, 1), shapes.flatten()))
        scores = {"pair_loss": pair_loss}
        if "centres" in part:
            patch_loss = patch_loss + self.hparams.centre_weight * self._centre_loss(tokens, colours, part["centres"])
            if self.hparams.relation_weight:
                relation_loss, scores["relations"] = self._relation_loss(tokens, colours, part["caption"],
                                                                         part["centres"])
                patch_loss = patch_loss + self.hparams.relation_weight * relation_loss
        scores["patch_loss"] = patch_loss
        scores["pairs_exact"] = ((pair_logits > 0) == targets.bool()).all(1).float().mean()
        return scores

    def _relation_loss(self, tokens, colours, captions, centres) -> tuple[torch.Tensor, torch.Tensor]:
        """The relational targets' loss on object patches, and the fraction of them whose nearest and furthest
        objects are both read right."""
        nearest, furthest, extremes = self._patch_relations(colours, self._colour_shapes(captions).to(colours.device),
                                                            centres)
        on_object = nearest >= 0
        if not on_object.any():
            return tokens.new_zeros(()), tokens.new_zeros(())
        logits = self.relation_head(tokens[on_object])
        nearest, furthest, extremes = nearest[on_object], furthest[on_object], extremes[on_object]
        near_logits, far_logits, extreme_logits = logits.split([len(PAIRS), len(PAIRS), len(EXTREMES)], -1)
        loss = (F.cross_entropy(near_logits, nearest) + F.cross_entropy(far_logits, furthest)
                + F.binary_cross_entropy_with_logits(extreme_logits, extremes))
        right = (near_logits.argmax(-1) == nearest) & (far_logits.argmax(-1) == furthest)
        return loss, right.float().mean()

    @staticmethod
    def _patch_relations(colours, colour_shapes, centres) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per patch of ``colours [B, N]`` (palette index, 0 background), given each colour's shape
        (``colour_shapes [B, 1 + colours]``: 1 + SHAPES index) and ``centres [B, colours, 2]`` (NaN: absent): the
        PAIRS index of the nearest and of the furthest other object (-1 off objects), and ``[B, N, len(EXTREMES)]``
        1.0 where the patch's object is the extreme one of EXTREMES' word."""
        num_colours = centres.shape[1]
        present = ~centres.isnan().any(-1)  # [B, C]
        distance = torch.cdist(centres.nan_to_num(0), centres.nan_to_num(0))
        others = present[:, None, :] & ~torch.eye(num_colours, dtype=torch.bool, device=centres.device)
        nearest = distance.masked_fill(~others, math.inf).argmin(-1)  # [B, C]: a colour index
        furthest = distance.masked_fill(~others, -math.inf).argmax(-1)
        shape_of = colour_shapes[:, 1:] - 1
        pair_of = lambda colour: (colour * len(SHAPES) + shape_of.gather(1, colour)).masked_fill(~present, -1)  # noqa: E731
        extremes = torch.stack([F.one_hot((sign * centres[..., axis]).masked_fill(~present, -math.inf).argmax(-1),
                                          num_colours).float() for axis, sign in EXTREMES.values()], -1)  # [B, C, 4]
        # index 0 of the palette is the background: no relations there
        near = F.pad(pair_of(nearest), (1, 0), value=-1).gather(1, colours)
        far = F.pad(pair_of(furthest), (1, 0), value=-1).gather(1, colours)
        flags = F.pad(extremes, (0, 0, 1, 0)).gather(1, colours[..., None].expand(-1, -1, len(EXTREMES)))
        return near, far, flags

    def _patch_colours(self, images: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``[B, N]``: the palette index (0 background, 1.. SCENE_COLOURS) nearest each patch's centre pixel."""
        side = int(num_tokens**0.5)
        step = images.shape[-1] // side
        centres = images[:, :, step // 2::step, step // 2::step].flatten(2).transpose(1, 2)  # [B, N, 3]
        return torch.cdist(centres, self.palette[None].expand(len(images), -1, -1)).argmin(-1)

    def _centre_loss(self, tokens: torch.Tensor, colours: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the centre of the object under each object patch, in patches (so that a
        patch's error weighs like the class losses)."""
        targets = self._patch_centres(colours, centres) * math.isqrt(tokens.shape[1])
        # an antialiased edge can sit nearest a colour the scene lacks: no centre to learn there
        on_object = ~targets.isnan().any(-1)
        if not on_object.any():
            return tokens.new_zeros(())
        return F.mse_loss(self.centre_head(tokens)[on_object], targets[on_object])

    @staticmethod
    def _patch_centres(colours: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """``[B, N, 2]``: the centre (fractions of the side) of the object whose colour is under each patch (NaN on
        the background), from ``centres [B, colours, 2]`` in SCENE_COLOURS' order."""
        padded = F.pad(centres, (0, 0, 1, 0), value=float("nan"))  # index 0: the background
        return padded.gather(1, colours[..., None].expand(-1, -1, 2))

    @staticmethod
    def _colour_shapes(captions: Sequence[str]) -> torch.Tensor:
        """``[B, 1 + colours]``: 1 + the SHAPES index of each palette colour's object (from the caption), 0 for the
        background and colours the scene lacks."""
        lookup = torch.zeros(len(captions), len(SCENE_COLOURS) + 1, dtype=torch.long)
        colour_index = {c: i + 1 for i, c in enumerate(SCENE_COLOURS)}
        for row, caption in enumerate(captions):
            for colour, shape in caption_pairs(caption):
                lookup[row, colour_index[colour]] = SHAPES.index(shape) + 1
        return lookup

    @classmethod
    def _patch_shapes(cls, colours: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """``[B, N]``: 0 background, else 1 + the SHAPES index of the object of that colour (from the caption)."""
        return cls._colour_shapes(captions).to(colours.device).gather(1, colours)

    def _sound_loss(self, part: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask = self.audio_encoder(part["audio"])
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        labels = torch.tensor([SOUND_LABELS.index(a) for a in part["answer"]], device=tokens.device)
        logits = self.sound_head(pooled)
        return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()

    def _step(self, batch, prefix: str) -> torch.Tensor:
        parts = VQAModule._parts(batch)
        total = 0.0
        if "image" in parts:
            scores = self._image_losses(parts["image"])
            self.log_dict({f"{prefix}/{name}": value for name, value in scores.items()}, add_dataloader_idx=False)
            total = total + scores["pair_loss"] + scores["patch_loss"]
        if "sound" in parts and self.audio_encoder is not None:
            sound_loss, accuracy = self._sound_loss(parts["sound"])
            self.log_dict({f"{prefix}/sound_loss": sound_loss, f"{prefix}/sound_accuracy": accuracy},
                          add_dataloader_idx=False)
            total = total + sound_loss
        if prefix == "train":
            self.log("train/loss", total, prog_bar=True)
        return total

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._step(batch if "prompt" not in batch else {("image" if "image" in batch else "sound"): batch}, "val")

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.parameters(), self.hparams)

    def on_fit_end(self):
        if self.trainer.is_global_zero:
            folder = run_path(self.trainer, self.hparams.save_dir)
            self.save_encoders(folder)
            print(f"saved the encoders to {folder}")

    def save_encoders(self, folder) -> None:
        """``image_encoder.safetensors`` (and ``audio_encoder.safetensors``) in ``folder``, written atomically."""
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in (("image_encoder", self.image_encoder), ("audio_encoder", self.audio_encoder)):
            if part is None:
                continue
            tmp = folder / f".{name}.safetensors.tmp"
            save_file({k: v.detach().contiguous() for k, v in part.state_dict().items()}, str(tmp))
            tmp.replace(folder / f"{name}.safetensors")
