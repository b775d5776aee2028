"""CLIP tokenisation against fixed expected ids (DESIGN.md, "Data": tokens)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from gtms.data.tokenizer import (
    EOT_ID,
    SOT_ID,
    WORD_LEN,
    ClipTokenizer,
    clean_text,
    is_empty_expression,
)

# Copied from shared/fixtures/clip_token_ids.json (OpenAI CLIP's tokenizer), so that this test
# does not depend on the fixture file alone.
LITERAL_CASES = [
    ("left sandwich", [49406, 1823, 8687, 49407] + [0] * 13),
    (
        "Person sitting with  legs crossed on the top in blue jeans",
        [49406, 2533, 4919, 593, 7072, 11731, 525, 518, 1253, 530, 1746, 10157, 49407] + [0] * 4,
    ),
    (
        "caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade",
        [49406, 15304, 1075, 12138, 614, 267, 1097, 35689, 563, 778, 10067, 1928, 49407] + [0] * 4,
    ),
]


def _fixture_path() -> Path:
    """tests/fixtures/clip_token_ids.json: a copy of shared/fixtures' reference ids (OpenAI's
    tokenizer), kept in the repository so a fresh clone tests with nothing beside it."""
    return Path(__file__).resolve().parent / "fixtures" / "clip_token_ids.json"


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.mark.parametrize(("text", "ids"), LITERAL_CASES)
def test_literal_expected_ids(tokenizer, text, ids):
    out = tokenizer([text])
    assert out.dtype == np.int64 and out.shape == (1, WORD_LEN)
    assert out[0].tolist() == ids


def test_all_fixture_cases(tokenizer):
    fixture = json.loads(_fixture_path().read_text())
    assert (fixture["sot"], fixture["eot"]) == (SOT_ID, EOT_ID)
    cases = fixture["cases"]
    assert len(cases) > 3
    out = tokenizer([c["text"] for c in cases], word_len=fixture["word_len"])
    for row, case in zip(out, cases, strict=True):
        assert row.tolist() == case["ids"], case["text"]


def test_truncation_keeps_eot_last(tokenizer):
    text = "white car partially hidden behind the tree on the far left of the picture near road"
    for word_len in (4, 8, WORD_LEN):
        row = tokenizer([text], word_len=word_len)[0]
        assert row.shape == (word_len,)
        assert row[0] == SOT_ID and row[-1] == EOT_ID
        assert np.all(row != 0)
        assert np.count_nonzero(row == EOT_ID) == 1
    long_row = tokenizer([text], word_len=40)[0]
    short_row = tokenizer([text], word_len=WORD_LEN)[0]
    assert short_row[: WORD_LEN - 1].tolist() == long_row[: WORD_LEN - 1].tolist()


def test_padding_is_zero_after_eot(tokenizer):
    out = tokenizer(["man", "far right"], word_len=10)
    for row in out:
        eot = int(np.flatnonzero(row == EOT_ID)[0])
        assert row[0] == SOT_ID
        assert np.all(row[eot + 1 :] == 0) and np.all(row[:eot] != 0)


def test_cleaning_matches_clip(tokenizer):
    # whitespace runs collapse, NFD input normalises to NFC, HTML entities are unescaped
    same = [("a \t red\n  ring ", "a red ring"), ("cafe\u0301", "caf\u00e9"), ("&amp;", "&")]
    for raw, clean in same:
        assert tokenizer([raw]).tolist() == tokenizer([clean]).tolist()


def _row(*ids: int) -> list[int]:
    return [SOT_ID, *ids, EOT_ID] + [0] * (WORD_LEN - 2 - len(ids))


# Sentences that need OpenAI's full cleaning (ftfy.fix_text, html.unescape twice, whitespace,
# lower-case). Each is derived by hand: the cleaned text (2nd column) is what OpenAI's
# basic_clean + whitespace_clean leave, and its ids are known word by word: from
# shared/fixtures/clip_token_ids.json ('s 568, the 518, left 1823, man 786, red 736, car 1615,
# cafe-acute 15304, & 261, a 320, in 530) or from the vocabulary (it 585, cat 2368, toy 5988,
# " 257, fish 2759, "mo" 617 + "ji" 3252 + "bake" 11878, non-final "man" 723, b 321). The same ids
# came out of OpenAI's own simple_tokenizer (ftfy 6.3.1), run once outside this repository.
OPENAI_CLEANING_CASES = [
    # ftfy uncurls quotes: "it's the cat's toy" -> it / 's / the / cat / 's / toy
    ("it\u2019s the cat\u2019s toy", "it's the cat's toy", _row(585, 568, 518, 2368, 568, 5988)),
    # curly double quotes -> '"', a word of its own
    ("\u201cleft\u201d man", '"left" man', _row(257, 1823, 257, 786)),
    # the fi ligature U+FB01 -> "fi"
    ("\ufb01sh", "fish", _row(2759)),
    # full-width letters -> ASCII
    ("\uff52\uff45\uff44 car", "red car", _row(736, 1615)),
    # UTF-8 read as Latin-1 ("Ã©") is repaired to "é"
    ("caf\u00c3\u00a9 mojibake", "caf\u00e9 mojibake", _row(15304, 617, 3252, 11878)),
    # ftfy removes U+0000 (it does not turn it into a space): "manin" = "man" + "in"
    ("man\x00in red", "manin red", _row(723, 530, 736)),
    # ftfy unescapes the entity, then html.unescape twice more: "&amp;amp;amp;" -> "&"
    ("a &amp;amp;amp; b", "a & b", _row(320, 261, 321)),
    # empty after cleaning: CRIS's [SOT, EOT]
    ("", "", _row()),
    ("   ", "", _row()),
    ("\t\n", "", _row()),
    ("&nbsp;", "", _row()),  # -> U+00A0, which is whitespace
]


@pytest.mark.parametrize(("raw", "clean", "ids"), OPENAI_CLEANING_CASES)
def test_openai_cleaning_ids(tokenizer, raw, clean, ids):
    assert clean_text(raw) == clean
    assert tokenizer([raw])[0].tolist() == ids
    assert tokenizer([clean])[0].tolist() == ids


# OpenAI's split pattern, not instant-clip-tokenizer's: its special markers are the literal
# "<|startoftext|>" / "<|endoftext|>" (instant's are "<start_of_text>" / "<end_of_text>"), and it
# is case-insensitive, so "'" + U+017F LONG S is the contraction "'s" of a single BPE word. Ids
# from OpenAI's simple_tokenizer (see above); "<" 283, ">" 285, "_" 318, "of" 539, "man" 786.
OPENAI_SPLIT_CASES = [
    ("<|startoftext|>man", _row(SOT_ID, 786)),
    ("man <|ENDOFTEXT|>", _row(786, EOT_ID)),
    ("<start_of_text>", _row(283, 1572, 318, 539, 318, 4160, 285)),
    ("'\u017f", _row(6, 129, 379)),
    ("<|\u017ftartoftext|>", _row(27, 91, 129, 123, 2002, 6659, 18169, 91, 285)),
]


@pytest.mark.parametrize(("text", "ids"), OPENAI_SPLIT_CASES)
def test_openai_split_pattern(tokenizer, text, ids):
    assert tokenizer([text])[0].tolist() == ids


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "&nbsp;", "&amp;nbsp;", "\x00"])
def test_empty_after_cleaning_is_sot_eot(tokenizer, text):
    assert is_empty_expression(text)
    out = tokenizer(["fine sentence", text], word_len=5)
    assert out[1].tolist() == [SOT_ID, EOT_ID, 0, 0, 0]
    assert tokenizer.bpe_ids(text) == []


@pytest.mark.parametrize("text", ["a", "&amp;", "\u2019", "1", "\U0001f600", "\u200b"])
def test_not_empty(tokenizer, text):
    assert not is_empty_expression(text)
    assert tokenizer.bpe_ids(text)


def test_rejects_bare_string_and_tiny_word_len(tokenizer):
    with pytest.raises(TypeError):
        tokenizer("left sandwich")
    with pytest.raises(ValueError):
        tokenizer(["left sandwich"], word_len=1)


def test_empty_batch_and_pickle(tokenizer):
    assert tokenizer([]).shape == (0, WORD_LEN)
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone(["closer puppy"]).tolist() == tokenizer(["closer puppy"]).tolist()
