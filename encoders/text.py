"""Text encoders: the text tower of an open_clip model, as ``encode(prompts) -> (tokens, pooled)``.

:class:`TextEncoder` builds only the text tower of an open_clip config (token embedding, positional
embedding, transformer, final LayerNorm, text projection, causal mask), with open_clip's tokenizer for it:

- any built-in open_clip config name (``"ViT-B-32"``, ``"ViT-L-14"``, ...) with random weights, or with
  ``pretrained=`` an open_clip tag or checkpoint file (downloaded / read by open_clip; the vision tower is
  built to load the checkpoint and dropped right away);
- our small configs (:data:`TEXT_CONFIGS`, e.g. ``"moezoo-text-tiny"``: width 64, 2 layers, 4 heads,
  context 16, CLIP's 49408-token BPE vocabulary) for the small bundled models. They are random at
  construction: their weights come with our model checkpoints. Nothing is downloaded for them.

Outputs, both in the tower's output width ``output_dim`` (the CLIP joint-embedding width):

- ``pooled [B, D]``: CLIP's text embedding (final LayerNorm, the EOT token's feature, the text projection);
- ``tokens [B, N, D]``: every position's final-LayerNorm feature through the same text projection (so the
  two share a width; positions after EOT are padding).

With the causal mask (every CLIP text config), a prompt's features do not depend on its padding or on the
other prompts of the batch. Towers built on Hugging Face transformers (``hf_model_name`` configs) are not
supported.
"""

from __future__ import annotations

import copy

import open_clip
import torch
import torch.nn as nn
from open_clip.model import CLIPTextCfg, _build_text_tower
from open_clip.tokenizer import SimpleTokenizer

__all__ = ["TextEncoder", "TEXT_CONFIGS", "TINY_TEXT_MODEL"]

TINY_TEXT_MODEL = "moezoo-text-tiny"
# Our configs, in open_clip's model-config format (embed_dim + text_cfg).
TEXT_CONFIGS: dict[str, dict] = {
    TINY_TEXT_MODEL: {
        "embed_dim": 64,
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    },
}
# The CLIP attributes that are its text tower (open_clip's CLIP keeps them at top level).
_TOWER_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")


def _model_config(model_name: str) -> dict:
    if model_name in TEXT_CONFIGS:
        return copy.deepcopy(TEXT_CONFIGS[model_name])
    config = open_clip.get_model_config(model_name)
    if config is None or "text_cfg" not in config:
        known = ", ".join([*TEXT_CONFIGS, "ViT-B-32", "ViT-L-14", "..."])
        raise ValueError(f"unknown text encoder config {model_name!r}: give one of ours or an open_clip config "
                         f"name ({known}; open_clip.list_models() lists them)")
    return copy.deepcopy(config)


class TextEncoder(nn.Module):
    """The text tower of an open_clip model and its tokenizer.

    Args:
        model_name: an open_clip config name or one of :data:`TEXT_CONFIGS`.
        pretrained: an open_clip pretrained tag (e.g. ``"laion2b_s34b_b79k"``) or checkpoint path; None:
            random initialisation (our configs only accept None).
        context_length: override the config's token context length (tokenizer and positions).
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None,
                 context_length: int | None = None):
        super().__init__()
        config = _model_config(model_name)
        text_cfg = CLIPTextCfg(**config["text_cfg"])
        if text_cfg.hf_model_name:
            raise NotImplementedError(f"{model_name} has a Hugging Face text tower ({text_cfg.hf_model_name}); "
                                      "TextEncoder supports open_clip's own TextTransformer towers")
        if context_length is not None:
            text_cfg.context_length = context_length
        text_cfg.output_tokens = True
        self.model_name, self.context_length = model_name, text_cfg.context_length
        quick_gelu = config.get("quick_gelu", False)
        if pretrained is None:
            self.text = _build_text_tower(config["embed_dim"], text_cfg, quick_gelu=quick_gelu)
        elif model_name in TEXT_CONFIGS:
            raise ValueError(f"{model_name} has no open_clip weights (pretrained must be None); its weights come "
                             "with the checkpoints of the models that use it")
        else:
            self.text = self._pretrained_tower(model_name, pretrained, config["embed_dim"], text_cfg, quick_gelu,
                                               context_length)
        if model_name in TEXT_CONFIGS:
            self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        else:
            self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.context_length)
        projection = self.text.text_projection
        if projection is None:
            self.output_dim = text_cfg.width
        else:
            self.output_dim = projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    @staticmethod
    def _pretrained_tower(model_name, pretrained, embed_dim, text_cfg, quick_gelu, context_length) -> nn.Module:
        """open_clip builds and loads the whole model (its conversions and checks apply); we keep the text
        parts in a tower shell built on the meta device, and drop the rest."""
        full = open_clip.create_model(model_name, pretrained=pretrained, force_context_length=context_length,
                                      require_pretrained=True)
        if hasattr(full, "text"):  # CustomTextCLIP keeps its tower whole
            tower = full.text
            tower.output_tokens = True
        else:
            with torch.device("meta"):
                tower = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
            for part in _TOWER_PARTS:
                setattr(tower, part, getattr(full, part))
        del full
        on_meta = [n for n, t in [*tower.named_parameters(), *tower.named_buffers()] if t.is_meta]
        if on_meta:
            raise RuntimeError(f"{model_name}: the pretrained model left text-tower tensors unset: {on_meta}")
        return tower

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids ``int64 [B, context_length]`` (start, BPE tokens, end, zero padding; truncated)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt (\"\" for an unconditional one)")
        return self.tokenizer(list(prompts)).long()

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.text.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``token_ids [B, N]`` -> ``(tokens [B, N, output_dim], pooled [B, output_dim])``."""
        pooled, tokens = self.text(token_ids.to(self.device))
        return self._project(tokens), pooled

    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and encode: ``(tokens [B, N, output_dim], pooled [B, output_dim])``."""
        return self(self.tokenize(prompts))
