"""The model registry: named entrypoints, their pretrained cfgs, and ``create_model``.

A model family registers tiny entrypoints at the bottom of its file::

    @register_model(pretrained_cfgs={
        "digits": PretrainedCfg(file="dit_moe_digits.safetensors", sha256="...", model_args=dict(num_classes=10)),
    }, checkpoint_filter=checkpoint_filter)
    def dit_moe_s(pretrained: bool = False, **kwargs) -> DiTMoE:
        return DiTMoE(**dict(depth=6, dim=384, **kwargs))

and users build models by name::

    create_model("dit_moe_s")                            # architecture only, random init
    create_model("dit_moe_s", pretrained=True)           # default (first) tag's weights
    create_model("dit_moe_s.digits", pretrained=True)    # a named tag
    create_model("hf-hub:org/repo@v1", pretrained=True)  # config.json + model.safetensors of a Hub repo
    create_model("local-dir:/path/export", pretrained=True)  # the same two files in a folder (save_pretrained)
    create_model("dit_moe_s", checkpoint_path="train.pt", checkpoint_key="ema")  # any local checkpoint

Which constructor arguments are used: a name that selects a checkpoint (``arch.tag``, ``hf-hub:``,
``local-dir:``) or ``pretrained=True`` builds that checkpoint's architecture, i.e. the entrypoint gets the
cfg's ``model_args`` with the caller's overrides on top; a bare ``arch`` with ``pretrained=False`` gets the
overrides only. Overrides equal to None are dropped (CLI defaults do not override the model's defaults).
The returned model carries the cfg it was built from as ``model.pretrained_cfg`` (None for a bare arch).

Every load (pretrained weights or ``checkpoint_path``) strips wrapper key prefixes (``module.``,
``_orig_mod.``, Lightning's ``model.``), passes the state dict through the family's ``checkpoint_filter``
and loads it with ``strict=True``; a mismatch lists the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from moezoo.zoo import hub

_logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
_MODEL_PACKAGE = "moezoo.zoo.models"  # imported on first lookup: importing it registers every family
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, a LightningModule's self.model
_SHOWN_KEYS = 5  # how many keys of each kind a mismatch error lists

CheckpointFilter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class PretrainedCfg:
    """Where one pretrained checkpoint's weights are, what they were trained with, and what to know about them.

    Attributes:
        file: a file bundled in the package, relative to ``moezoo/zoo/weights/``.
        url: http(s) URL of a safetensors file.
        sha256: the pinned hash of ``url`` (also checked for ``file`` when given).
        hf_hub_id: ``"org/repo"`` on the Hugging Face Hub.
        hf_hub_filename: the weights file in that repo.
        revision: the Hub revision (branch, tag or commit).
        model_args: the constructor overrides this checkpoint was trained with.
        metadata: free-form: label_names, image_size, license, paper, notes, quality numbers.
    """

    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    hf_hub_id: str | None = None
    hf_hub_filename: str = "model.safetensors"
    revision: str | None = None
    model_args: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", hub.checked_sha256(self.sha256))  # frozen: set once, lowercased


# name -> entrypoint as written (called with pretrained=False), its pretrained cfgs by tag (the first is the
# default), and its checkpoint filter.
_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_pretrained_cfgs: dict[str, dict[str, PretrainedCfg]] = {}
_checkpoint_filters: dict[str, CheckpointFilter] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    pretrained_cfgs: dict[str, PretrainedCfg] | None = None,
    checkpoint_filter: CheckpointFilter | None = None,
):
    """Register an entrypoint ``def name(pretrained: bool = False, **kwargs) -> nn.Module`` under its
    function name. Usable bare (``@register_model``) or with arguments.

    The entrypoint only builds the model: the registry loads weights. The decorated function stays callable
    directly and then behaves as ``create_model(name, pretrained, **kwargs)``.

    Args:
        pretrained_cfgs: tag -> cfg; the first tag is the default. Each cfg must name a weight source.
        checkpoint_filter: ``(state_dict, model) -> state_dict`` mapping foreign (official) keys to ours. Every
            load goes through it, so it must return a state dict that already has our keys unchanged.
    """

    def register(entrypoint: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = entrypoint.__name__
        for tag, cfg in (pretrained_cfgs or {}).items():
            if not tag or not isinstance(cfg, PretrainedCfg):
                raise ValueError(f"{name}: pretrained_cfgs must map non-empty tags to PretrainedCfg, got {tag!r}")
            if cfg.file is None and cfg.url is None and cfg.hf_hub_id is None:
                raise ValueError(f"pretrained cfg {name}.{tag} names no weights: set file, url or hf_hub_id")
        if name in _entrypoints:
            _logger.warning("overwriting model %s in the registry", name)
        _entrypoints[name] = entrypoint
        _pretrained_cfgs[name] = dict(pretrained_cfgs or {})
        _checkpoint_filters.pop(name, None)
        if checkpoint_filter is not None:
            _checkpoint_filters[name] = checkpoint_filter

        @functools.wraps(entrypoint)
        def create(pretrained: bool = False, **kwargs) -> nn.Module:
            return create_model(name, pretrained=pretrained, **kwargs)

        return create

    return register if fn is None else register(fn)


def unregister_model(name: str) -> None:
    """Remove a model from the registry (for tests and interactive sessions)."""
    _entrypoints.pop(name)
    _pretrained_cfgs.pop(name, None)
    _checkpoint_filters.pop(name, None)


# ----------------------------------------------------------------------------------------------------------
# Lookups
# ----------------------------------------------------------------------------------------------------------


def _ensure_families_registered() -> None:
    importlib.import_module(_MODEL_PACKAGE)


def split_model_name_tag(name: str) -> tuple[str, str]:
    """``"arch.tag"`` -> ``("arch", "tag")``; ``"arch"`` -> ``("arch", "")``. Splits on the first dot."""
    arch, _, tag = name.partition(".")
    return arch, tag


def _natural_key(name: str) -> list:
    # "net2" before "net10": digit runs compare as numbers (re.split alternates text and digits).
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _matches(candidates: Iterable[str], patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(c.lower(), p.lower()) for c in candidates for p in patterns)


def list_models(
    filter: str | list[str] = "*", pretrained: bool = False, exclude_filters: str | Iterable[str] = ()
) -> list[str]:
    """Registered model names matching any fnmatch ``filter``, in natural order (``net2`` before ``net10``).

    With ``pretrained=True``, the ``"arch.tag"`` of every pretrained cfg instead; a filter or exclude filter
    may then match either the ``arch`` or the ``arch.tag``.
    """
    _ensure_families_registered()
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p] or ["*"]
    excludes = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    if pretrained:
        names = [(f"{arch}.{tag}", arch) for arch, cfgs in _pretrained_cfgs.items() for tag in cfgs]
    else:
        names = [(arch, arch) for arch in _entrypoints]
    found = [full for full, arch in names if _matches((full, arch), patterns) and not _matches((full, arch), excludes)]
    return sorted(found, key=_natural_key)


def list_pretrained(filter: str | list[str] = "*") -> list[str]:
    """The ``"arch.tag"`` names of all pretrained cfgs matching ``filter``."""
    return list_models(filter, pretrained=True)


def is_model(name: str) -> bool:
    """Whether ``name`` (``arch`` or ``arch.tag``) is registered (and, with a tag, that the tag exists)."""
    _ensure_families_registered()
    arch, tag = split_model_name_tag(name)
    return arch in _entrypoints and (not tag or tag in _pretrained_cfgs[arch])


def _check_registered(arch: str) -> None:
    if arch in _entrypoints:
        return
    close = difflib.get_close_matches(arch, list(_entrypoints), n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown model {arch!r}.{hint} list_models() lists the registered names "
                     "(with wildcards, e.g. list_models('*dit*')).")


def get_pretrained_cfg(name_with_tag: str) -> PretrainedCfg:
    """The pretrained cfg of ``"arch.tag"``, or of the default (first) tag for ``"arch"``."""
    _ensure_families_registered()
    arch, tag = split_model_name_tag(name_with_tag)
    _check_registered(arch)
    cfgs = _pretrained_cfgs[arch]
    if not cfgs:
        raise ValueError(f"Model {arch!r} has no pretrained weights; list_pretrained() lists those that do.")
    if not tag:
        return next(iter(cfgs.values()))
    if tag not in cfgs:
        raise ValueError(f"Unknown pretrained tag {tag!r} for {arch}; its tags: {', '.join(cfgs)} "
                         f"(the first is the default).")
    return cfgs[tag]


# ----------------------------------------------------------------------------------------------------------
# create_model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """What a model name resolves to: the architecture, the cfg it builds (if any), how to get its weights."""

    arch: str
    description: str  # for messages
    cfg: PretrainedCfg | None = None
    weights: Callable[[], Path] | None = None


def _read_config(path: Path, where: str) -> tuple[str, dict, dict]:
    try:
        config = json.loads(path.read_text())
        arch, model_args = config["architecture"], config.get("model_args", {})
        pretrained_cfg = config.get("pretrained_cfg", {})
        if not (isinstance(arch, str) and isinstance(model_args, dict) and isinstance(pretrained_cfg, dict)):
            raise TypeError("architecture must be a string, model_args and pretrained_cfg objects")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"invalid {hub.CONFIG_NAME} of {where} ({path}): {err!r}. Expected "
                         '{"architecture": <registered name>, "model_args": {...}, "pretrained_cfg": {...}}') from None
    return arch, model_args, pretrained_cfg


def _config_source(model_name: str, cache_dir, local_files_only: bool, progress: bool) -> _Source:
    """An ``hf-hub:org/repo[@rev]`` or ``local-dir:PATH`` source: config.json and model.safetensors."""
    if model_name.startswith(HF_HUB_PREFIX):
        repo_id, _, revision = model_name.removeprefix(HF_HUB_PREFIX).partition("@")
        fetch = functools.partial(hub.hf_hub_file, repo_id, revision=revision or None, cache_dir=cache_dir,
                                  local_files_only=local_files_only, progress=progress)
        config_path = fetch(hub.CONFIG_NAME)
        location: dict[str, Any] = dict(hf_hub_id=repo_id, hf_hub_filename=hub.WEIGHTS_NAME, revision=revision or None)

        def weights() -> Path:
            return fetch(hub.WEIGHTS_NAME)
    else:
        folder = Path(model_name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
        config_path, location = folder / hub.CONFIG_NAME, {}
        if not config_path.is_file():
            raise FileNotFoundError(f"{model_name}: no {hub.CONFIG_NAME} in {folder} (a local-dir: folder holds "
                                    f"{hub.CONFIG_NAME} and {hub.WEIGHTS_NAME}, as written by save_pretrained)")

        def weights() -> Path:
            path = folder / hub.WEIGHTS_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{model_name}: no {hub.WEIGHTS_NAME} in {folder}")
            return path

    arch, model_args, pretrained_cfg = _read_config(config_path, model_name)
    _check_registered(arch)
    cfg = PretrainedCfg(**location, model_args=model_args, metadata=pretrained_cfg.get("metadata", {}))
    return _Source(arch, model_name, cfg, weights)


def _resolve(model_name: str, pretrained: bool, cache_dir, local_files_only: bool, progress: bool) -> _Source:
    if model_name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return _config_source(model_name, cache_dir, local_files_only, progress)
    if any(c in model_name for c in "/\\:"):
        raise ValueError(
            f"{model_name!r} is not a registered model name. For a Hugging Face Hub repo use "
            f"'{HF_HUB_PREFIX}{model_name}'; for a folder with {hub.CONFIG_NAME} and {hub.WEIGHTS_NAME} use "
            f"'{LOCAL_DIR_PREFIX}{model_name}'; for a single weights file pass checkpoint_path=."
        )
    arch, tag = split_model_name_tag(model_name)
    _check_registered(arch)
    if not (tag or pretrained):
        return _Source(arch, arch)
    cfg = get_pretrained_cfg(model_name)
    tag = tag or next(iter(_pretrained_cfgs[arch]))
    weights = functools.partial(hub.resolve_pretrained, cfg, f"{arch}.{tag}", cache_dir=cache_dir,
                                local_files_only=local_files_only, progress=progress)
    return _Source(arch, f"{arch}.{tag}", cfg, weights)


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop a prefix every key has and the model's keys do not (``module.``, ``_orig_mod.``, ``model.``)."""
    model_keys = list(model.state_dict())
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict) and not all(k.startswith(prefix) for k in model_keys):
                state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def _shown(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _load_weights(model: nn.Module, state_dict: dict, arch: str, source: str, overrides: dict) -> None:
    state_dict = _strip_wrapper_prefixes(state_dict, model)
    if arch in _checkpoint_filters:
        state_dict = _checkpoint_filters[arch](state_dict, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"The weights of {source} do not fit {arch} ({type(model).__name__}):"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                lines.append(f"  {len(keys)} {what} key{'s' if len(keys) > 1 else ''}: {_shown(keys)}")
        if overrides:
            given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            lines.append(f"  The overrides {given} may change the architecture these weights were trained with.")
        raise RuntimeError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
    _logger.info("loaded %s weights from %s", arch, source)


def create_model(
    model_name: str,
    pretrained: bool = False,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    progress: bool = True,
    **overrides,
) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        model_name: ``arch``, ``arch.tag``, ``hf-hub:org/repo[@revision]`` or ``local-dir:PATH``.
        pretrained: load the weights of the selected cfg (the default tag for a bare ``arch``), or the
            ``model.safetensors`` of an ``hf-hub:``/``local-dir:`` source.
        checkpoint_path: a local checkpoint loaded after construction (and after pretrained weights):
            ``.safetensors`` or a foreign ``.pt``/``.pth``/``.bin``/``.ckpt`` (see :func:`hub.load_checkpoint`).
        checkpoint_key: the entry of a pickled training checkpoint that holds the weights (e.g. ``"ema"``);
            default: ``"model"``/``"state_dict"``/``"module"``, else ``"ema"``.
        cache_dir: download cache folder (default: the Hugging Face cache).
        local_files_only: no network; cached files only (as ``HF_HUB_OFFLINE=1``).
        progress: show download progress bars.
        **overrides: constructor arguments; None values are dropped; they win over the cfg's ``model_args``.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _ensure_families_registered()
    source = _resolve(model_name, pretrained, cache_dir, local_files_only, progress)
    model_args = {**(source.cfg.model_args if source.cfg else {}), **overrides}
    model = _entrypoints[source.arch](pretrained=False, **model_args)
    if pretrained:
        _load_weights(model, hub.load_safetensors(source.weights()), source.arch, source.description, overrides)
    if checkpoint_path is not None:
        state_dict = hub.load_checkpoint(checkpoint_path, checkpoint_key)
        _load_weights(model, state_dict, source.arch, str(checkpoint_path), overrides)
    model.pretrained_cfg = source.cfg
    return model
