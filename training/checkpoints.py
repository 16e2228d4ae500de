"""Reading Lightning checkpoints without running code from them.

A ``.ckpt`` is a pickle, and a pickle can name any callable to call while it loads (``os.system`` included).
Every checkpoint moezoo reads — ``moezoo-export``, and ``moezoo-train fit|validate|test|predict --ckpt_path`` —
goes through ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts and the few types in
:data:`SAFE_GLOBALS`, nothing that runs. A checkpoint that names anything else is refused with
:class:`UnsafeCheckpointError`, which says what it named.
"""

from __future__ import annotations

import contextlib
import pathlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["SAFE_GLOBALS", "UnsafeCheckpointError", "safe_checkpoint_globals", "load_checkpoint"]

#: Beyond torch's weights-only defaults, what checkpoints of moezoo's modules hold: a DataModule given a
#: ``pathlib.Path`` (ImageFolderDataModule's ``root``...) keeps it in its saved hyper-parameters. A path is data.
SAFE_GLOBALS: tuple[type, ...] = (pathlib.PosixPath,)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked to load something other than data (a function or class that would run)."""


@contextlib.contextmanager
def safe_checkpoint_globals() -> Iterator[None]:
    """While active, ``torch.load(weights_only=True)`` (ours and Lightning's) also accepts :data:`SAFE_GLOBALS`."""
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        yield


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path`` read weights-only (memory-mapped: reading the hyper-parameters of a big
    checkpoint does not load its tensors).

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the pickle names a function or class outside the weights-only set.
        ValueError: the file is not a torch checkpoint (or is damaged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    try:
        with safe_checkpoint_globals():
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise _refusal(path, error) from None
    except RuntimeError as error:  # not a zip archive torch can read: truncated, or not a checkpoint at all
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint ({error})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict)")
    return checkpoint


def _refusal(path: Path, error: pickle.UnpicklingError) -> Exception:
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    if named is None:
        return ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint: {str(error).splitlines()[0]}")
    return UnsafeCheckpointError(
        f"refusing checkpoint {str(path)!r}: its pickle names {named.group(1)}, which is code, not data. moezoo "
        f"reads checkpoints weights-only (tensors, numbers, strings, lists, dicts, "
        f"{', '.join(t.__module__ + '.' + t.__name__ for t in SAFE_GLOBALS)}); a checkpoint written by "
        "moezoo-train never needs more. Do not load this file with torch.load(weights_only=False).")
