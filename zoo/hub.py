"""Weight files: where a checkpoint comes from, how it is verified and cached, how it is read and written.

A pretrained cfg (:class:`moezoo.zoo.registry.PretrainedCfg`) names up to three sources, tried in this order:

1. ``file``: a file bundled with the package: the repository's ``zoo/weights/`` folder, installed as
   ``moezoo/zoo/weights/`` (:data:`WEIGHTS_DIR`; no network, always first);
2. ``url``: an http(s) URL of a safetensors file, downloaded once into the Hugging Face cache layout (see
   :func:`download_url`);
3. ``hf_hub_id``: a Hugging Face Hub repo, through ``huggingface_hub.hf_hub_download`` (see :func:`hf_hub_file`).

When every source fails, the error names each one and why it failed. Offline mode (``HF_HUB_OFFLINE=1`` or
``local_files_only=True``) makes no HTTP call: cached files are used, anything else is a clear error.

What enters the cache (:func:`download_url`): only a complete, verified file. The body is streamed to a
temporary ``*.incomplete`` file in the cache root; its size must equal the Content-Length (when the server
sends one); a pinned file must have its sha256, an unpinned one must parse as safetensors (header, dtypes,
offsets covering the file exactly). Only then are the blob and ``refs/main`` written. File names taken from
URLs are reduced to a plain base name and every path written or linked is checked to stay inside the cache.
A download killed outright (SIGKILL, power loss) leaves its ``*.incomplete`` file behind; the next download
into that cache removes it (see :func:`remove_orphaned_downloads` for the rule that spares live downloads).

Our weights are safetensors only. Foreign checkpoints (``.pt``/``.pth``/``.bin``/``.ckpt`` pickles) are read
with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects (a pickle that would run code
is an error, and the code does not run). Files written by :func:`save_pretrained` appear whole or not at all:
each is written to a temporary file in the same folder and moved into place with ``os.replace``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import pickle
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any, BinaryIO

import huggingface_hub
import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled
from tqdm.auto import tqdm

from moezoo import __version__

try:  # POSIX: downloads lock their temporary files (see remove_orphaned_downloads)
    import fcntl
except ImportError:  # Windows
    fcntl = None

if TYPE_CHECKING:
    from moezoo.zoo.registry import PretrainedCfg

_logger = logging.getLogger(__name__)

# Bundled checkpoints: the repository's zoo/weights/, installed as moezoo/zoo/weights/ (package data).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CONFIG_NAME = "config.json"  # the two files of a saved model (local-dir: and hf-hub: sources)
WEIGHTS_NAME = "model.safetensors"
DOWNLOAD_TIMEOUT_S = 30.0  # connect and per-read timeout of URL downloads
# An empty temporary file this old and unlocked is an orphan (see remove_orphaned_downloads).
ORPHAN_GRACE_S = 60.0
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

_TEMP_SUFFIX = ".incomplete"
_TEMP_NAME_RE = re.compile(r"\..+\.[0-9a-f]{12}\.incomplete")  # the names _temp_name makes, and no others


def _temp_name(folder: Path, name: str) -> Path:
    # A fresh name per writer, so concurrent writers of the same target never share a temporary file.
    return folder / f".{name}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}"


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


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None. safetensors checks the header (its length,
    JSON, known dtypes) and that the tensors' offsets and sizes cover the rest of the file exactly, so a
    truncated or padded file, or an HTML error page, is refused. Only the header is read."""
    try:
        with safetensors.safe_open(str(path), framework="pt"):
            return None
    except (safetensors.SafetensorError, OSError) as err:
        return str(err)


# ----------------------------------------------------------------------------------------------------------
# URL downloads into the Hugging Face cache layout
# ----------------------------------------------------------------------------------------------------------
#
#   <cache>/models--moezoo--url-<sha256(url)[:16]>/
#       blobs/<sha256 of the content>                  the bytes, verified
#       snapshots/<sha256>/<file name from the URL>    a symlink to the blob (a copy where symlinks fail)
#       refs/main                                      the sha256 last downloaded, for URLs without a pin
#   <cache>/.<file name>.<random>.incomplete           a download in progress, locked by its writer


def url_cache_dir(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of one URL."""
    return cache_root(cache_dir) / f"models--moezoo--url-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def url_filename(url: str) -> str:
    """The name a URL's file is cached under: the last segment of the URL's path, percent-decoded, reduced
    to a base name. Whatever decodes to a separator (``%2F``, ``%5C``), a drive (``C:``) or a parent
    (``..``) is cut away with what precedes it; an empty name becomes ``model.safetensors``; control
    characters (NUL...) are an error."""
    last_segment = urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]
    name = PureWindowsPath(urllib.parse.unquote(last_segment)).name  # splits on "/", "\" and drive letters
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"the file name in {url!r} decodes to {name!r}, which holds control characters")
    return WEIGHTS_NAME if name in ("", ".", "..") else name


def _cache_path(repo_dir: Path, *parts: str) -> Path:
    """``repo_dir / parts``, once checked to resolve (symlinks followed) inside the cache folder."""
    path = repo_dir.joinpath(*parts)
    root = repo_dir.parent.resolve()
    if not path.resolve().is_relative_to(root):
        raise DownloadError(f"refusing to write {path}: it resolves to {path.resolve()}, outside the cache {root}")
    return path


def _snapshot(repo_dir: Path, sha: str, filename: str) -> Path:
    """The snapshot path of a verified blob, created (atomically) if missing."""
    snapshot = _cache_path(repo_dir, "snapshots", sha, filename)
    if snapshot.is_file():
        return snapshot
    blob = _cache_path(repo_dir, "blobs", sha)
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
    """The cached file if present and still valid. A blob whose bytes lost their hash, or an unpinned one
    that is not a complete safetensors file (cached before downloads were checked), is removed: the caller
    downloads it again."""
    ref = _cache_path(repo_dir, "refs", "main")
    sha = sha256 or (ref.read_text().strip() if ref.is_file() else None)
    if sha is None or not _SHA256_RE.fullmatch(sha):  # nothing cached, or a garbled ref (never used in a path)
        return None
    blob = _cache_path(repo_dir, "blobs", sha)
    if not blob.is_file():
        return None
    got = sha256_file(blob)
    problem = f"sha256 {got}, expected {sha}" if got != sha else None
    if problem is None and sha256 is None:
        problem = safetensors_problem(blob)
    if problem is not None:
        _logger.warning("removing invalid cache entry %s: %s", blob, problem)
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

    A cached copy is re-hashed (and, unpinned, re-parsed) and returned without any request. Otherwise
    stale ``*.incomplete`` files of killed downloads are removed (:func:`remove_orphaned_downloads`), the
    body is streamed to a locked temporary file in the cache folder while hashing, and it enters the cache
    only if it is complete and valid: its size equals the Content-Length (when sent), its hash equals
    ``sha256`` (when pinned) or, unpinned, it parses as a safetensors file whose tensors cover it exactly.
    On an HTTP error, a connection silent for ``DOWNLOAD_TIMEOUT_S``, a truncated body, a wrong hash, an
    invalid file or an interruption, nothing is added to the cache and the next call downloads again.

    Args:
        url: http(s) URL of the file.
        sha256: the expected sha256 (hex). Without it the file must be safetensors; it is cached under the
            hash it turned out to have, and later calls return that file.
        cache_dir: cache folder (default: see :func:`cache_root`).
        local_files_only: never use the network (as does ``HF_HUB_OFFLINE=1``).
        progress: show a tqdm progress bar (see :func:`progress_enabled`).

    Raises:
        NotCachedError: offline and not cached.
        ChecksumError: the downloaded bytes do not have the pinned hash.
        DownloadError: HTTP error, unreachable or silent server, truncated, interrupted or (unpinned) not
            a complete safetensors file.
        ValueError: not an http(s) URL, or its file name holds control characters.
    """
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"download_url takes an http(s) URL, got {url!r}")
    if sha256 is not None:
        sha256 = checked_sha256(sha256)
    repo_dir, filename = url_cache_dir(url, cache_dir), url_filename(url)
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
    """Stream ``url`` into ``repo_dir/blobs/<sha256>`` once complete and valid; return the sha256."""
    # The temporary file sits in the cache root (same filesystem as the blob, so os.replace is atomic) and
    # the repo folders are only created once the file is verified: a failure leaves the cache as it was.
    root = repo_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    remove_orphaned_downloads(root)
    response = _open_url(url)
    with response, _locked_temp_file(root, filename) as (tmp, out):
        got = _receive(url, filename, response, out, progress)
        if expected_sha is not None and got != expected_sha:
            raise ChecksumError(
                f"sha256 mismatch for {filename} from {url}: expected {expected_sha}, got {got}. "
                "The file was not cached; if it changed on the server, the pinned sha256 must be updated."
            )
        if expected_sha is None and (problem := safetensors_problem(tmp)) is not None:
            raise DownloadError(
                f"{url} did not give a complete safetensors file ({problem}); it was not cached. Without a "
                "pinned sha256 only safetensors files are accepted: pin the sha256 to download anything else."
            )
        blob = _cache_path(repo_dir, "blobs", got)
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, blob)
    if expected_sha is None:
        with atomic_path(_cache_path(repo_dir, "refs", "main")) as ref_tmp:
            ref_tmp.write_text(got)
    return got


def _open_url(url: str) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": f"moezoo/{__version__}"})
    try:
        return urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        raise DownloadError(f"HTTP {err.code} {err.reason} for {url}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise DownloadError(f"could not download {url}: {getattr(err, 'reason', err)}") from err


def _receive(url: str, filename: str, response: http.client.HTTPResponse, out: BinaryIO, progress: bool) -> str:
    """Copy the body into ``out`` while hashing; return its sha256. A body shorter than its Content-Length,
    a dropped connection or one silent for ``DOWNLOAD_TIMEOUT_S`` is a DownloadError."""
    length = response.headers.get("Content-Length", "")
    expected_size = int(length) if length.isdigit() else None
    received, digest = 0, hashlib.sha256()
    bar = tqdm(total=expected_size, unit="B", unit_scale=True, unit_divisor=1024, desc=filename,
               disable=not progress_enabled(progress))
    try:
        with bar:
            # read1: whatever arrived, up to a chunk, so the file grows (and the bar moves) as bytes come in
            while chunk := response.read1(_CHUNK_BYTES):
                out.write(chunk)
                out.flush()  # on disk at once: a killed download leaves a non-empty, unlocked orphan
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except (http.client.HTTPException, ConnectionError, TimeoutError) as err:
        size = f"{received} of {expected_size}" if expected_size is not None else str(received)
        raise DownloadError(f"download of {url} was interrupted after {size} bytes: {err!r}") from err
    if expected_size is not None and received != expected_size:
        raise DownloadError(f"truncated download of {url}: got {received} of {expected_size} bytes")
    return digest.hexdigest()


@contextmanager
def _locked_temp_file(folder: Path, name: str) -> Iterator[tuple[Path, BinaryIO]]:
    """A new temporary file in ``folder``, open for writing and exclusively locked until the block ends,
    then removed unless it was moved into place. The lock tells :func:`remove_orphaned_downloads` that its
    writer is alive; the kernel drops it when the process ends, however it ends."""
    tmp = _temp_name(folder, name)
    out = open(tmp, "xb")
    try:
        if fcntl is not None:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX)  # waits only while a cleaner looks at the new, empty file
        yield tmp, out
    finally:
        tmp.unlink(missing_ok=True)  # before closing: the file never holds bytes while unlocked by a live writer
        out.close()


def remove_orphaned_downloads(root: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed downloads left in the cache folder ``root``; return them.

    The rule never removes a live download's file. Every download holds an exclusive ``flock`` on its
    temporary file from before its first byte until the file is moved into the cache or removed, and the
    kernel releases the lock when the process ends, also on SIGKILL. So a temporary file with bytes in it
    that no one has locked has no writer left, whatever its age. An empty one may belong to a writer between
    creating and locking it (microseconds); it is removed only once older than ``ORPHAN_GRACE_S``. Only the
    ``.<name>.<12 hex>.incomplete`` files of this module are considered. Without ``fcntl`` (Windows) nothing
    is removed. A cache shared over NFS relies on the server's locks (NFSv4 or lockd), as
    ``huggingface_hub``'s own cache locks do.
    """
    removed: list[Path] = []
    if fcntl is None:
        return removed
    for path in Path(root).iterdir():
        if not _TEMP_NAME_RE.fullmatch(path.name):
            continue
        try:
            f = open(path, "rb")
        except OSError:  # moved into place or removed meanwhile, or not ours to read
            continue
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer holds it
                continue
            stat = os.fstat(f.fileno())
            if stat.st_size == 0 and time.time() - stat.st_mtime < ORPHAN_GRACE_S:
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        _logger.info("removed %d orphaned download(s) from %s: %s", len(removed), root,
                     ", ".join(p.name for p in removed))
    return removed


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
    cache folder and offline rules of :func:`download_url`.

    Offline, a file that is not cached is a :class:`NotCachedError` without any request. Online, a file
    that is not cached is first asked for with one HEAD request, bounded by ``HF_HUB_ETAG_TIMEOUT``
    (huggingface_hub's setting, 10 s by default) and not retried, so an unreachable Hub is a
    :class:`DownloadError` at once (``hf_hub_download`` alone retries for about 24 s). An HTTP error of the
    Hub (unknown repo or file, gated repo) is raised as huggingface_hub raises it.
    """
    where = f"{repo_id}{'@' + revision if revision else ''} {filename}"
    cache = cache_root(cache_dir)
    offline = offline_reason(local_files_only)
    if offline is None:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
        if not isinstance(cached, str):
            _check_hub_answers(repo_id, filename, revision, where, cache)
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline is not None,
            library_name="moezoo",
            library_version=__version__,
            tqdm_class=None if progress_enabled(progress) else _SilentTqdm,
        )
    except LocalEntryNotFoundError as err:
        if offline is None:
            raise
        raise NotCachedError(f"hf hub {where} is not in the cache ({cache}) and offline mode is on ({offline}), "
                             "so it was not downloaded. Download it once with network access, or unset "
                             "offline mode.") from err
    return Path(path)


def _check_hub_answers(repo_id: str, filename: str, revision: str | None, where: str, cache: Path) -> None:
    """One HEAD request for the file, without retries: a DownloadError if the Hub does not answer."""
    url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=hf_constants.HF_HUB_ETAG_TIMEOUT,
                                             library_name="moezoo", library_version=__version__)
    except HfHubHTTPError:
        raise
    except Exception as err:  # noqa: BLE001 - the network errors depend on huggingface_hub's HTTP library
        raise DownloadError(
            f"could not reach the Hugging Face Hub for {where} ({url}): {type(err).__name__}: {err}. It is not "
            f"in the cache ({cache}). Check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached "
            "files only."
        ) from err


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


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def checked_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path``, once checked to be an existing file with a checkpoint suffix (``create_model`` checks it
    before building anything)."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"unsupported checkpoint {path}: expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" if not path.exists() else
                                f"checkpoint {path} is not a file")
    return path


def load_checkpoint(path: str | os.PathLike, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local file: ours (``.safetensors``) or a foreign pickle (``.pt``, ``.pth``,
    ``.bin``, ``.ckpt``), read with ``torch.load(weights_only=True, map_location="cpu")``: tensors, containers
    and plain values only. A pickle that would build any other object (and so could run code) is refused
    with a ValueError before anything in it runs; so is a TorchScript archive.

    Training checkpoints keep their weights in a container; it is unwrapped (repeatedly, for nested ones):
    ``checkpoint_key`` when given, else the first of ``"model"``, ``"state_dict"``, ``"module"`` that holds a
    dict, else ``"ema"``. When both ``"model"`` and ``"ema"`` are there, ``"model"`` is loaded and a warning
    says so; pass ``checkpoint_key="ema"`` for the EMA weights (what DiT samples with).

    Key prefixes of wrappers (``module.``, ``model.``...) are the registry's business: they depend on the model.
    """
    path = checked_checkpoint_path(path)
    if path.suffix == ".safetensors":
        if checkpoint_key is not None:
            raise ValueError(f"checkpoint_key applies to pickled checkpoints, not to the safetensors file {path}")
        return load_safetensors(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # RuntimeError: TorchScript, broken zip
        raise ValueError(
            f"{path} was refused: torch.load(weights_only=True) loads tensors and plain containers only, never "
            "other Python objects (they could run code), and moezoo loads no pickle any other way. If the file "
            "is yours and complete, re-save only its state dict (torch.save(model.state_dict(), ...)) or export "
            f"it with moezoo.zoo.hub.save_pretrained. torch.load said: {err or 'the file is empty or cut short'}"
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
