"""Weight files: where a checkpoint comes from, how it is verified and cached, how it is read and written.

A pretrained cfg (:class:`moezoo.zoo.registry.PretrainedCfg`) names up to three sources, tried in this order:

1. ``file``: a file bundled in the package, in ``moezoo/zoo/weights/`` (no network, always first);
2. ``url``: an http(s) URL, downloaded once into the Hugging Face cache layout and verified against the
   pinned ``sha256`` (see :func:`download_url`);
3. ``hf_hub_id``: a Hugging Face Hub repo, through ``huggingface_hub.hf_hub_download``.

When every source fails, the error names each one and why it failed. Offline mode (``HF_HUB_OFFLINE=1`` or
``local_files_only=True``) makes no HTTP call: cached files are used, anything else is a clear error.

Our weights are safetensors only. Foreign checkpoints (``.pt``/``.pth``/``.bin``/``.ckpt`` pickles) are read
with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects. Every file this module
writes (downloads, ``save_pretrained``) appears whole or not at all: it is written to a temporary file in
the same folder and moved into place with ``os.replace``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import huggingface_hub
import safetensors.torch
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import are_progress_bars_disabled
from tqdm.auto import tqdm

from moezoo import __version__

if TYPE_CHECKING:
    from moezoo.zoo.registry import PretrainedCfg

_logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # bundled checkpoints: moezoo/zoo/weights/
CONFIG_NAME = "config.json"  # the two files of a saved model (local-dir: and hf-hub: sources)
WEIGHTS_NAME = "model.safetensors"
DOWNLOAD_TIMEOUT_S = 30.0  # connect and per-read timeout of URL downloads
_CHUNK_BYTES = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ENV_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as a true environment value
# Containers that foreign training checkpoints keep their weights in, in order of preference. "ema" comes
# last: it is taken alone only when nothing else is there (see load_checkpoint).
_CHECKPOINT_CONTAINERS = ("model", "state_dict", "module", "ema")


class DownloadError(OSError):
    """A download failed: HTTP error, unreachable host, truncated body or interrupted transfer."""


class ChecksumError(DownloadError):
    """A file's sha256 differs from the pinned one."""


class NotCachedError(FileNotFoundError):
    """Offline mode is on and the file is not in the cache."""


class WeightsNotFoundError(FileNotFoundError):
    """No source of a pretrained cfg gave its weights; the message names each source and why it failed."""


# ----------------------------------------------------------------------------------------------------------
# Environment: cache folder, offline mode, progress bars (read at call time, so setting them later works)
# ----------------------------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in _ENV_TRUE


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's
    default (``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


def offline_reason(local_files_only: bool = False) -> str | None:
    """Why no network may be used (``"local_files_only=True"`` or ``"HF_HUB_OFFLINE=1"``), or None."""
    if local_files_only:
        return "local_files_only=True"
    if _env_true("HF_HUB_OFFLINE") or hf_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    return None


def progress_enabled(progress: bool = True) -> bool:
    """Progress bars show unless ``progress=False``, ``HF_HUB_DISABLE_PROGRESS_BARS=1`` or
    ``huggingface_hub.utils.disable_progress_bars()``."""
    return progress and not _env_true("HF_HUB_DISABLE_PROGRESS_BARS") and not are_progress_bars_disabled()


class _SilentTqdm(tqdm):
    """Handed to hf_hub_download as its tqdm_class when progress bars are off."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------------------


def _temp_name(folder: Path, name: str) -> Path:
    # A fresh name per writer, so concurrent writers of the same target never share a temporary file.
    return folder / f".{name}.{uuid.uuid4().hex[:12]}.incomplete"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; write it inside the block. On success it replaces
    ``target`` in one step; on any error (or KeyboardInterrupt) it is removed and ``target`` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target.parent, target.name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def checked_sha256(value: str) -> str:
    """A pinned sha256, lowercased; a ValueError unless it is 64 hex digits."""
    if not _SHA256_RE.fullmatch(value.lower()):
        raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
    return value.lower()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# URL downloads into the Hugging Face cache layout
# ----------------------------------------------------------------------------------------------------------
#
#   <cache>/models--moezoo--url-<sha256(url)[:16]>/
#       blobs/<sha256 of the content>                  the bytes, verified
#       snapshots/<sha256>/<file name from the URL>    a symlink to the blob (a copy where symlinks fail)
#       refs/main                                      the sha256 last downloaded, for URLs without a pin


def url_cache_dir(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of one URL."""
    return cache_root(cache_dir) / f"models--moezoo--url-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def _url_filename(url: str) -> str:
    return urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name) or WEIGHTS_NAME


def _snapshot(repo_dir: Path, sha: str, filename: str) -> Path:
    """The snapshot path of a verified blob, created (atomically) if missing."""
    snapshot = repo_dir / "snapshots" / sha / filename
    if snapshot.is_file():
        return snapshot
    blob = repo_dir / "blobs" / sha
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(snapshot.parent, filename)
    try:
        try:
            os.symlink(os.path.relpath(blob, snapshot.parent), tmp)
        except OSError:  # no symlinks here (e.g. Windows without developer mode): a copy
            tmp.write_bytes(blob.read_bytes())
        os.replace(tmp, snapshot)
    finally:
        tmp.unlink(missing_ok=True)
    return snapshot


def _cached(repo_dir: Path, filename: str, sha256: str | None) -> Path | None:
    """The cached file if present and its content still has its hash; a corrupted blob is removed."""
    ref = repo_dir / "refs" / "main"
    sha = sha256 or (ref.read_text().strip() if ref.is_file() else None)
    if sha is None or not (repo_dir / "blobs" / sha).is_file():
        return None
    blob = repo_dir / "blobs" / sha
    got = sha256_file(blob)
    if got != sha:
        _logger.warning("removing corrupted cache entry %s (sha256 %s, expected %s)", blob, got, sha)
        blob.unlink()
        return None
    return _snapshot(repo_dir, sha, filename)


def download_url(
    url: str,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """Download ``url`` into the cache once and return the cached file's path.

    A cached copy is re-hashed and returned without any request. Otherwise the body is streamed to a
    temporary file in the cache folder while hashing, its size is checked against Content-Length and its
    hash against ``sha256`` (when pinned), and only then is it moved into place. On an HTTP error, a
    truncated body, a wrong hash or an interruption nothing is left in the cache.

    Args:
        url: http(s) URL of the file.
        sha256: the expected sha256 (hex). Without it the download is cached under the hash it turned out
            to have, and later calls return that file.
        cache_dir: cache folder (default: see :func:`cache_root`).
        local_files_only: never use the network (as does ``HF_HUB_OFFLINE=1``).
        progress: show a tqdm progress bar (see :func:`progress_enabled`).

    Raises:
        NotCachedError: offline and not cached.
        ChecksumError: the downloaded bytes do not have the pinned hash.
        DownloadError: HTTP error, unreachable server, truncated or interrupted transfer.
    """
    if sha256 is not None:
        sha256 = checked_sha256(sha256)
    repo_dir, filename = url_cache_dir(url, cache_dir), _url_filename(url)
    cached = _cached(repo_dir, filename, sha256)
    if cached is not None:
        return cached
    offline = offline_reason(local_files_only)
    if offline:
        raise NotCachedError(
            f"{url} is not in the cache ({repo_dir}) and offline mode is on ({offline}), so it was not "
            "downloaded. Download it once with network access, or unset offline mode."
        )
    sha = _fetch(url, repo_dir, filename, sha256, progress)
    return _snapshot(repo_dir, sha, filename)


def _fetch(url: str, repo_dir: Path, filename: str, expected_sha: str | None, progress: bool) -> str:
    """Stream ``url`` into ``repo_dir/blobs/<sha256>``; return the sha256."""
    # The temporary file sits in the cache root (same filesystem as the blob, so os.replace is atomic) and
    # the repo folders are only created once the file is verified: a failure leaves the cache as it was.
    root = repo_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(root, filename)
    request = urllib.request.Request(url, headers={"User-Agent": f"moezoo/{__version__}"})
    received, expected_size = 0, None
    try:
        try:
            response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            raise DownloadError(f"HTTP {err.code} {err.reason} for {url}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            raise DownloadError(f"could not download {url}: {getattr(err, 'reason', err)}") from err
        with response, open(tmp, "xb") as out:
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length is not None else None
            digest = hashlib.sha256()
            bar = tqdm(
                total=expected_size, unit="B", unit_scale=True, unit_divisor=1024, desc=filename,
                disable=not progress_enabled(progress),
            )
            with bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected_size is not None and received != expected_size:
            raise DownloadError(f"truncated download of {url}: got {received} of {expected_size} bytes")
        got = digest.hexdigest()
        if expected_sha is not None and got != expected_sha:
            raise ChecksumError(
                f"sha256 mismatch for {filename} from {url}: expected {expected_sha}, got {got}. "
                "The file was not cached; if it changed on the server, the pinned sha256 must be updated."
            )
        blob = repo_dir / "blobs" / got
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, blob)
        if expected_sha is None:
            with atomic_path(repo_dir / "refs" / "main") as ref_tmp:
                ref_tmp.write_text(got)
        return got
    except (http.client.HTTPException, ConnectionError, TimeoutError) as err:
        size = f"{received} of {expected_size}" if expected_size is not None else str(received)
        raise DownloadError(f"download of {url} was interrupted after {size} bytes: {err!r}") from err
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face Hub and the pretrained-cfg source order
# ----------------------------------------------------------------------------------------------------------


def hf_hub_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """One file of a Hub repo through ``huggingface_hub.hf_hub_download``, tagged as moezoo's, sharing the
    cache folder and offline rules of :func:`download_url`."""
    path = huggingface_hub.hf_hub_download(
        repo_id,
        filename,
        revision=revision,
        cache_dir=cache_root(cache_dir),
        local_files_only=offline_reason(local_files_only) is not None,
        library_name="moezoo",
        library_version=__version__,
        tqdm_class=None if progress_enabled(progress) else _SilentTqdm,
    )
    return Path(path)


def resolve_pretrained(
    cfg: PretrainedCfg,
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """The local path of a pretrained cfg's weights: bundled file, then URL, then Hub (see module docstring).

    Args:
        cfg: the pretrained cfg.
        name: ``arch.tag``, for the error message.

    Raises:
        WeightsNotFoundError: naming every source tried and why each failed.
    """
    failures = []
    if cfg.file is not None:
        path = WEIGHTS_DIR / cfg.file
        if not path.is_file():
            failures.append(f"bundled file {cfg.file}: not found in {WEIGHTS_DIR}")
        elif cfg.sha256 is not None and (got := sha256_file(path)) != cfg.sha256:
            failures.append(f"bundled file {path}: sha256 mismatch, expected {cfg.sha256}, got {got}")
        else:
            return path
    if cfg.url is not None:
        try:
            return download_url(
                cfg.url, sha256=cfg.sha256, cache_dir=cache_dir, local_files_only=local_files_only, progress=progress
            )
        except OSError as err:  # DownloadError, ChecksumError, NotCachedError, or e.g. a read-only cache
            failures.append(f"url {cfg.url}: {err}")
    if cfg.hf_hub_id is not None:
        at_revision = f"@{cfg.revision}" if cfg.revision else ""
        try:
            return hf_hub_file(
                cfg.hf_hub_id, cfg.hf_hub_filename, revision=cfg.revision, cache_dir=cache_dir,
                local_files_only=local_files_only, progress=progress,
            )
        except Exception as err:  # noqa: BLE001 - hf raises many kinds (HTTP, offline, not found); all are reported
            failures.append(f"hf hub {cfg.hf_hub_id}{at_revision} {cfg.hf_hub_filename}: {type(err).__name__}: {err}")
    if not failures:
        raise WeightsNotFoundError(f"the pretrained cfg of {name} names no weights (no file, url or hf_hub_id)")
    tried = "\n".join(f"  - {failure}" for failure in failures)
    raise WeightsNotFoundError(f"could not get the weights of {name}; tried:\n{tried}")


# ----------------------------------------------------------------------------------------------------------
# Reading and writing checkpoints
# ----------------------------------------------------------------------------------------------------------


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Our weights: a safetensors file, on the CPU."""
    return safetensors.torch.load_file(str(path), device="cpu")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(path: str | os.PathLike, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local file: ours (``.safetensors``) or a foreign pickle (``.pt``, ``.pth``,
    ``.bin``, ``.ckpt``), read with ``torch.load(weights_only=True, map_location="cpu")``.

    Training checkpoints keep their weights in a container; it is unwrapped (repeatedly, for nested ones):
    ``checkpoint_key`` when given, else the first of ``"model"``, ``"state_dict"``, ``"module"`` that holds a
    dict, else ``"ema"``. When both ``"model"`` and ``"ema"`` are there, ``"model"`` is loaded and a warning
    says so; pass ``checkpoint_key="ema"`` for the EMA weights (what DiT samples with).

    Key prefixes of wrappers (``module.``, ``model.``...) are the registry's business: they depend on the model.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if checkpoint_key is not None:
            raise ValueError(f"checkpoint_key applies to pickled checkpoints, not to the safetensors file {path}")
        return load_safetensors(path)
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise ValueError(f"unsupported checkpoint {path}: expected .safetensors, .pt, .pth, .bin or .ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds Python objects that torch.load(weights_only=True) refuses to unpickle ({err}). "
            "Re-save only its state dict (torch.save(model.state_dict(), ...)), or export the model with "
            "moezoo.zoo.hub.save_pretrained."
        ) from None
    if checkpoint_key is not None:
        if not isinstance(checkpoint, Mapping) or checkpoint_key not in checkpoint:
            keys = list(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise KeyError(f"{path} has no {checkpoint_key!r} entry; its top level: {keys}")
        checkpoint = checkpoint[checkpoint_key]
    while isinstance(checkpoint, Mapping) and not _is_state_dict(checkpoint):
        container = next((k for k in _CHECKPOINT_CONTAINERS if isinstance(checkpoint.get(k), Mapping)), None)
        if container is None:
            break
        if container == "model" and isinstance(checkpoint.get("ema"), Mapping):
            _logger.warning("%s holds both 'model' and 'ema' weights; loading 'model' (checkpoint_key='ema' "
                            "loads the EMA weights)", path)
        checkpoint = checkpoint[container]
    if not _is_state_dict(checkpoint):
        top = list(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"found no state dict (a dict of tensors) in {path}; its top level: {top}. "
                         "Pass checkpoint_key= to name the entry that holds the weights.")
    return dict(checkpoint)


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    architecture: str,
    model_args: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Export a model as ``config.json`` + ``model.safetensors``, to reload with
    ``create_model("local-dir:DIR", pretrained=True)`` (or from a Hub repo holding the two files, with
    ``"hf-hub:org/repo"``).

    Args:
        model: the model whose ``state_dict()`` is saved.
        directory: the folder (created if missing; existing files of the same names are replaced).
        architecture: the registered model name that builds it (without a ``.tag``).
        model_args: the constructor overrides it was built with (JSON-able: tuples come back as lists).
        metadata: free-form, JSON-able (label names, image size, license, notes...); reloaded into
            ``model.pretrained_cfg.metadata``.
        dtype: store floating-point tensors in this dtype (e.g. ``torch.float16`` to halve a bundled file);
            loading casts them back to the model's dtype. None keeps each tensor's own dtype.

    Each file is written to a temporary name in ``directory`` and moved into place, the weights first,
    so a folder with a config.json always has complete weights.
    """
    if any(c in architecture for c in "./\\:"):
        raise ValueError(f"architecture must be a registered model name without a tag, got {architecture!r}")
    config = {
        "architecture": architecture,
        "model_args": dict(model_args),
        "pretrained_cfg": {"metadata": dict(metadata or {})},
    }
    text = json.dumps(config, indent=2) + "\n"  # fails on non-JSON values before anything is written
    tensors, storages = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        value = value.contiguous()
        if value.untyped_storage().data_ptr() in storages:  # tied weights: safetensors refuses shared storage
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    directory = Path(directory)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)  # safetensors creates the file owner-only; exported weights are meant to be shared
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(text)
    return directory
