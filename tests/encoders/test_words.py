"""WordVocabulary: ids laid out as documented (words, <unk>, specials), encode/decode round trips, errors."""

import pytest

from moezoo.encoders.words import WordVocabulary, split_words


def test_ids_are_words_then_unknown_then_specials_and_round_trip():
    vocab = WordVocabulary(("a", "red", "c#4"), specials=("<pad>", "<eos>"))
    assert len(vocab) == 6 and vocab.unknown_id == 3
    assert (vocab.special_id("<pad>"), vocab.special_id("<eos>")) == (4, 5)
    assert split_words("A Red, C#4 note!") == ["a", "red", "c#4", "note"]
    assert vocab.encode("A Red, C#4 note!") == [0, 1, 2, 3]
    assert vocab.encode("a red", length=4, pad="<pad>") == [0, 1, 4, 4]
    assert vocab.unknown_words("a blue note") == ["blue", "note"]
    assert vocab.decode([0, 1, 3, 4, 5]) == "a red <unk>"


@pytest.mark.parametrize("words, specials, message", [
    (("a", "a"), (), "distinct lower-case words"),
    (("A",), (), "distinct lower-case words"),
    (("a",), ("a",), "special tokens must be distinct"),
    (("a",), ("<unk>",), "special tokens must be distinct"),
])
def test_bad_vocabularies_are_refused(words, specials, message):
    with pytest.raises(ValueError, match=message):
        WordVocabulary(words, specials)


def test_too_many_words_and_unknown_specials():
    vocab = WordVocabulary(("a",), ("<pad>",))
    with pytest.raises(ValueError, match="has 3 words; at most 2"):
        vocab.encode("a a a", length=2, pad="<pad>")
    with pytest.raises(KeyError, match="not one of this vocabulary's special tokens"):
        vocab.special_id("<bos>")
