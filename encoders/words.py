"""A word-level vocabulary for the small models' own prompts and answers (the bundled audio model's captions,
the VQA scenes' questions): lower-case words of letters, digits and '#', split out of any text.

Ids: the words in the order given, then ``<unk>`` (any other word), then the special tokens asked for in order
(e.g. ``<null>`` for a padded or dropped prompt, ``<bos>``, ``<eos>``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["WordVocabulary", "WORD_PATTERN", "split_words"]

WORD_PATTERN = r"[a-z0-9#]+"
UNKNOWN = "<unk>"


def split_words(text: str) -> list[str]:
    """The words of ``text``, lower-cased; punctuation and spaces separate them."""
    return re.findall(WORD_PATTERN, text.lower())


class WordVocabulary:
    """``words`` (distinct, lower case, letters / digits / '#') + ``<unk>`` + ``specials``."""

    def __init__(self, words: Sequence[str], specials: Sequence[str] = ()) -> None:
        words = tuple(words)
        if len(set(words)) != len(words) or any(not re.fullmatch(WORD_PATTERN, w) for w in words):
            raise ValueError("a vocabulary must be distinct lower-case words (letters, digits, '#')")
        if len(set(specials)) != len(specials) or any(s in words or s == UNKNOWN for s in specials):
            raise ValueError(f"special tokens must be distinct and not words or {UNKNOWN}: {list(specials)}")
        self.words, self.specials = words, tuple(specials)
        self._index = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.words) + 1 + len(self.specials)

    @property
    def unknown_id(self) -> int:
        return len(self.words)

    def special_id(self, name: str) -> int:
        if name not in self.specials:
            raise KeyError(f"{name!r} is not one of this vocabulary's special tokens {list(self.specials)}")
        return len(self.words) + 1 + self.specials.index(name)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in split_words(text) if w not in self._index]

    def encode(self, text: str, length: int | None = None, pad: str | None = None) -> list[int]:
        """The ids of ``text``'s words (``<unk>`` for unknown ones); with ``length``, padded with ``pad`` (a special
        token) to that many, and a text of more words is an error."""
        ids = [self._index.get(w, self.unknown_id) for w in split_words(text)]
        if length is None:
            return ids
        if len(ids) > length:
            raise ValueError(f"{text!r} has {len(ids)} words; at most {length} are read")
        return ids + [self.special_id(pad)] * (length - len(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids`` joined by spaces; special tokens are left out, ``<unk>`` is kept."""
        names = [*self.words, UNKNOWN, *self.specials]
        return " ".join(names[i] for i in ids if names[i] not in self.specials)
