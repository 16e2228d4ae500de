"""The model registry: named entrypoints, their pretrained cfgs, and ``create_model``.

A model family registers tiny entrypoints at the bottom of its file (zoo/models/dit_moe.py holds real ones).
The entrypoint only constructs; the registry builds, checks the size and loads weights:

    >>> import torch.nn as nn
    >>> from moezoo.zoo import PretrainedCfg, create_model, register_model
    >>> @register_model(pretrained_cfgs={
    ...     "wide": PretrainedCfg(file="tiny_mlp_wide.safetensors", model_args={"dim": 16}),
    ... })
    ... def tiny_mlp(pretrained: bool = False, dim: int = 8) -> nn.Module:
    ...     return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 3))
    >>> create_model("tiny_mlp")[0].in_features        # architecture only, random init
    8
    >>> create_model("tiny_mlp.wide")[0].in_features   # the architecture of the tag (its model_args)
    16

Users build registered models by name:

    >>> model = create_model("dit_moe_digits")                            # architecture only, random init
    >>> model = create_model("dit_moe_digits", pretrained=True)           # default (first) tag: bundled weights
    >>> model = create_model("dit_moe_digits.default", pretrained=True)   # a tag by name
    >>> model.pretrained_cfg.metadata["label_names"][:3]
    ['0', '1', '2']

and models of their own (placeholders in angle brackets)::

    create_model("local-dir:<folder>", pretrained=True)  # config.json + model.safetensors, as save_pretrained writes
    create_model("hf-hub:<org>/<repo>@<revision>", pretrained=True)  # the same two files in a Hub repo
    create_model("dit_moe_digits", checkpoint_path="<train.pt>", checkpoint_key="ema")  # a local checkpoint

Which constructor arguments are used: a name that selects a checkpoint (``arch.tag``, ``hf-hub:``,
``local-dir:``) or ``pretrained=True`` builds that checkpoint's architecture, i.e. the entrypoint gets the
cfg's ``model_args`` with the caller's overrides on top; a bare ``arch`` with ``pretrained=False`` gets the
overrides only. Overrides equal to None are dropped (CLI defaults do not override the model's defaults).
The returned model carries the cfg it was built from as ``model.pretrained_cfg`` (None for a bare arch).

Before anything is allocated or downloaded, ``create_model`` checks that a ``checkpoint_path`` exists and
builds the model once on the meta device (no memory for tensors) to count its parameters: a model above
``max_parameters`` (default :data:`MAX_PARAMETERS`, 4e9) is refused with its size in the message, and so is
one that registers more than :data:`MAX_MODEL_PARTS` modules and parameter tensors. (Called under
``torch.device("meta")``, create_model allocates nothing and skips the check.) A config.json whose
values do not build its architecture is a :class:`ConfigError` naming the source and, when it can, the field.

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
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
MAX_PARAMETERS = 4_000_000_000  # create_model's default max_parameters: 16 GB of float32 weights
# Modules + parameter tensors a model may register. The largest in the zoo (dit_moe_g_2_16e2a) registers
# 1,470; building 20,000 on the meta device takes about a second, which bounds the size check itself.
MAX_MODEL_PARTS = 20_000

CheckpointFilter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


class ModelTooLargeError(ValueError):
    """A model's parameters pass ``max_parameters``, or it registers more than MAX_MODEL_PARTS modules and
    parameter tensors; found before its weights are allocated."""


class ConfigError(ValueError):
    """The config.json of a ``local-dir:`` or ``hf-hub:`` source does not build its architecture."""


@dataclass(frozen=True)
class PretrainedCfg:
    """Where one pretrained checkpoint's weights are, what they were trained with, and what to know about them.

    Attributes:
        file: a bundled file, relative to the repository's ``zoo/weights/`` (installed as
            ``moezoo/zoo/weights/``, :data:`moezoo.zoo.hub.WEIGHTS_DIR`).
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
# Size check: count what a model registers while it is built, on the meta device first
# ----------------------------------------------------------------------------------------------------------


class _TooManyParts(Exception):
    """Raised inside a build when it registers more than MAX_MODEL_PARTS modules and parameter tensors."""


@dataclass
class _Tally:
    """What a model registered so far while being built in one thread."""

    parameters: int = 0
    nbytes: int = 0
    parts: int = 0  # modules + parameter tensors
    dtypes: set = field(default_factory=set)

    def size(self) -> str:
        dtypes = "/".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes)) or "float32"
        return f"{self.parameters:,} parameters ({self.nbytes / 1e9:,.1f} GB as {dtypes})"


@contextmanager
def _tally_registrations(abort_above: int | None = None) -> Iterator[_Tally]:
    """Count the parameters and modules that this thread's code registers inside the block (global torch
    hooks that ignore other threads, removed afterwards). A shared parameter counts once. Raises
    _TooManyParts past MAX_MODEL_PARTS and, with ``abort_above``, ModelTooLargeError once the parameters
    pass it (for builds that allocate: the tensor that passes the limit is the last one allocated)."""
    owner, tally, seen = threading.get_ident(), _Tally(), {}

    def count_part() -> None:
        tally.parts += 1
        if tally.parts > MAX_MODEL_PARTS:
            raise _TooManyParts

    def on_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is None or threading.get_ident() != owner or id(param) in seen:
            return
        seen[id(param)] = param  # held, so that its id is not reused by another tensor
        tally.parameters += param.numel()
        tally.nbytes += param.numel() * param.element_size()
        tally.dtypes.add(param.dtype)
        count_part()
        if abort_above is not None and tally.parameters > abort_above:
            raise ModelTooLargeError(f"more than max_parameters={abort_above:,}: building stopped at {tally.size()}")

    def on_module(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        if submodule is not None and threading.get_ident() == owner:
            count_part()

    hooks = [torch.nn.modules.module.register_module_parameter_registration_hook(on_parameter),
             torch.nn.modules.module.register_module_module_registration_hook(on_module)]
    try:
        yield tally
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def _meta_build() -> Iterator[None]:
    """Build on the meta device: shapes without memory, and the caller's random state left as it was."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        yield


def _args_text(model_args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in model_args.items()) or "none"


def _fits_on_meta(build: Callable[[], nn.Module], what: str, model_args: dict, max_parameters: int) -> bool:
    """Build the model on the meta device and raise ModelTooLargeError if its parameters pass
    ``max_parameters``. False when the model cannot be built on the meta device (its constructor computes
    with tensor values): the caller then counts while building for real."""
    with _tally_registrations() as tally:
        try:
            with _meta_build():
                model = build()
        except _TooManyParts:
            raise ModelTooLargeError(
                f"{what} (model_args: {_args_text(model_args)}) registers more than MAX_MODEL_PARTS="
                f"{MAX_MODEL_PARTS:,} modules and parameter tensors; the size check stopped building it on the "
                f"meta device there, at {tally.size()}. A depth or count is probably far too large; "
                "max_parameters=None builds it without any size check."
            ) from None
        except (TypeError, ValueError):
            raise
        except Exception as err:  # noqa: BLE001 - what a constructor raises on meta tensors is not ours to list
            if tally.parameters > max_parameters:
                raise ModelTooLargeError(
                    f"{what} (model_args: {_args_text(model_args)}) has more than max_parameters="
                    f"{max_parameters:,} parameters: building it on the meta device counted {tally.size()} "
                    f"before it failed ({type(err).__name__}: {err})"
                ) from err
            _logger.debug("%s cannot be built on the meta device (%r): its size is counted while it is built",
                          what, err)
            return False
    # The final count is what the model holds: the tally also counted parameters replaced during __init__.
    parameters = list(model.parameters())
    tally = _Tally(sum(p.numel() for p in parameters), sum(p.numel() * p.element_size() for p in parameters),
                   dtypes={p.dtype for p in parameters})
    if tally.parameters > max_parameters:
        raise ModelTooLargeError(
            f"{what} (model_args: {_args_text(model_args)}) has {tally.size()}, more than max_parameters="
            f"{max_parameters:,}. Counted by building it on the meta device, before any weight was allocated. "
            "Pass a larger max_parameters= to build it (None skips the check)."
        )
    return True


def _size_is_checked(build: Callable[[], nn.Module], what: str, model_args: dict,
                     max_parameters: int | None) -> bool:
    """Check the model's size before it is built (see create_model's ``max_parameters``). False when the
    size could not be known in advance: :func:`_build_counting` then counts while building."""
    # Under a meta default device (the caller's, or an outer size check that counts this build too)
    # nothing is allocated.
    if max_parameters is None or torch.get_default_device().type == "meta":
        return True
    return _fits_on_meta(build, what, model_args, max_parameters)


def _build_counting(build: Callable[[], nn.Module], what: str, model_args: dict, max_parameters: int) -> nn.Module:
    """Build for real, stopping as soon as the parameters pass ``max_parameters``."""
    try:
        with _tally_registrations(abort_above=max_parameters):
            return build()
    except _TooManyParts:
        raise ModelTooLargeError(f"{what} (model_args: {_args_text(model_args)}) registers more than "
                                 f"{MAX_MODEL_PARTS:,} modules and parameter tensors") from None
    except ModelTooLargeError as err:
        raise ModelTooLargeError(f"{what} (model_args: {_args_text(model_args)}): {err}") from None


def _checked_max_parameters(value: float | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"max_parameters must be a positive number (e.g. 8e9) or None, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# Errors in a config.json
# ----------------------------------------------------------------------------------------------------------

_BUILD_ERRORS = (TypeError, ValueError, RuntimeError, OverflowError)  # what bad constructor arguments raise


def _fails_alone(entrypoint: Callable[..., nn.Module], key: str, value: Any) -> bool:
    """Whether the entrypoint fails on the meta device with ``key=value`` as its only argument."""
    try:
        with _tally_registrations(), _meta_build():
            entrypoint(**{key: value})
    except (_TooManyParts, *_BUILD_ERRORS):
        return True
    return False


def _fields_at_fault(err: Exception, entrypoint: Callable[..., nn.Module], config_args: dict) -> list[str]:
    """The config fields the error names; else those that fail on their own (when the defaults build on
    the meta device, so that a failure is the field's)."""
    named = [k for k in config_args if re.search(rf"\b{re.escape(k)}\b", str(err))]
    if named or not config_args:
        return named
    try:
        with _tally_registrations(), _meta_build():
            entrypoint()
    except Exception:  # noqa: BLE001 - when the defaults fail too, a failure says nothing about a field
        return []
    return [k for k, v in config_args.items() if _fails_alone(entrypoint, k, v)]


@contextmanager
def _config_errors(source: _Source, entrypoint: Callable[..., nn.Module]) -> Iterator[None]:
    """Inside the block, a constructor error of a model built from a config.json becomes a ConfigError that
    names the source and the fields at fault."""
    if source.config_file is None:
        yield
        return
    try:
        yield
    except ModelTooLargeError:
        raise
    except _BUILD_ERRORS as err:
        config_args = source.cfg.model_args
        fields = _fields_at_fault(err, entrypoint, config_args)
        at_fault = (f"The field{'s' if len(fields) > 1 else ''} at fault: "
                    + ", ".join(f"{k}={config_args[k]!r} ({type(config_args[k]).__name__})" for k in fields)
                    if fields else f"Its model_args: {_args_text(config_args)}")
        raise ConfigError(f"{source.description}: the model_args of {source.config_file} do not build "
                          f"{source.arch}: {type(err).__name__}: {err}. {at_fault}.") from err


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
    config_file: Path | None = None  # the config.json of a local-dir: or hf-hub: source


def _read_config(path: Path, where: str) -> tuple[str, dict, dict]:
    try:
        config = json.loads(path.read_text())
        arch, model_args = config["architecture"], config.get("model_args", {})
        pretrained_cfg = config.get("pretrained_cfg", {})
        if not (isinstance(arch, str) and isinstance(model_args, dict) and isinstance(pretrained_cfg, dict)):
            raise TypeError("architecture must be a string, model_args and pretrained_cfg objects")
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"invalid {hub.CONFIG_NAME} of {where} ({path}): {err!r}. Expected "
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
    return _Source(arch, model_name, cfg, weights, config_path)


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
    max_parameters: float | None = MAX_PARAMETERS,
    **overrides,
) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        model_name: ``arch``, ``arch.tag``, ``hf-hub:org/repo[@revision]`` or ``local-dir:PATH``.
        pretrained: load the weights of the selected cfg (the default tag for a bare ``arch``), or the
            ``model.safetensors`` of an ``hf-hub:``/``local-dir:`` source.
        checkpoint_path: a local checkpoint loaded after construction (and after pretrained weights):
            ``.safetensors`` or a foreign ``.pt``/``.pth``/``.bin``/``.ckpt`` (see
            :func:`moezoo.zoo.hub.load_checkpoint`).
            Checked to exist before anything is built.
        checkpoint_key: the entry of a pickled training checkpoint that holds the weights (e.g. ``"ema"``);
            default: ``"model"``/``"state_dict"``/``"module"``, else ``"ema"``.
        cache_dir: download cache folder (default: the Hugging Face cache).
        local_files_only: no network; cached files only (as ``HF_HUB_OFFLINE=1``).
        progress: show download progress bars.
        max_parameters: refuse (ModelTooLargeError, before any weight is allocated or downloaded) a model
            with more parameters than this; the count comes from building the model on the meta device
            first (milliseconds for the bundled models). Default :data:`MAX_PARAMETERS`, 4e9 (16 GB in
            float32): the paper's XL and G DiT-MoEs (4.2B to 16.5B parameters) need a larger value, e.g.
            ``max_parameters=2e10``. None skips the check, and so does a call under ``torch.device("meta")``
            (nothing is allocated there).
        **overrides: constructor arguments; None values are dropped; they win over the cfg's ``model_args``.

    Raises:
        ModelTooLargeError: more than ``max_parameters`` parameters, or more than :data:`MAX_MODEL_PARTS`
            modules and parameter tensors.
        ConfigError: the config.json of a ``local-dir:``/``hf-hub:`` source does not build its architecture.
        FileNotFoundError: ``checkpoint_path`` does not exist (see also :mod:`moezoo.zoo.hub`'s errors).
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    max_parameters = _checked_max_parameters(max_parameters)
    if checkpoint_path is not None:
        checkpoint_path = hub.checked_checkpoint_path(checkpoint_path)
    _ensure_families_registered()
    source = _resolve(model_name, pretrained, cache_dir, local_files_only, progress)
    model_args = {**(source.cfg.model_args if source.cfg else {}), **overrides}
    entrypoint = functools.partial(_entrypoints[source.arch], pretrained=False)
    build = functools.partial(entrypoint, **model_args)
    with _config_errors(source, entrypoint):
        size_checked = _size_is_checked(build, source.description, model_args, max_parameters)
    weights_path = source.weights() if pretrained else None  # a missing or refused file fails before the build
    with _config_errors(source, entrypoint):
        model = build() if size_checked else _build_counting(build, source.description, model_args, max_parameters)
    if weights_path is not None:
        _load_weights(model, hub.load_safetensors(weights_path), source.arch, source.description, overrides)
    if checkpoint_path is not None:
        state_dict = hub.load_checkpoint(checkpoint_path, checkpoint_key)
        _load_weights(model, state_dict, source.arch, str(checkpoint_path), overrides)
    model.pretrained_cfg = source.cfg
    return model
