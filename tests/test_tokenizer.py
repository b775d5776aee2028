"""CLIP tokenisation against fixed expected ids (DESIGN.md, "Data": tokens)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from gtms.data.tokenizer import EOT_ID, SOT_ID, WORD_LEN, ClipTokenizer

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
    """shared/fixtures/clip_token_ids.json: $GTMS_SHARED, else shared/ beside or inside the repo."""
    repo = Path(__file__).resolve().parents[1]
    roots = [Path(os.environ["GTMS_SHARED"])] if "GTMS_SHARED" in os.environ else []
    roots += [repo.parent / "shared", repo / "shared"]
    for root in roots:
        path = root / "fixtures" / "clip_token_ids.json"
        if path.is_file():
            return path
    raise FileNotFoundError(f"clip_token_ids.json not found under any of {roots}")


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


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "&nbsp;"])
def test_empty_sentence_raises_naming_it(tokenizer, text):
    with pytest.raises(ValueError, match="empty referring expression") as info:
        tokenizer(["fine sentence", text])
    assert repr(text) in str(info.value)


def test_rejects_bare_string_and_tiny_word_len(tokenizer):
    with pytest.raises(TypeError):
        tokenizer("left sandwich")
    with pytest.raises(ValueError):
        tokenizer(["left sandwich"], word_len=1)


def test_empty_batch_and_pickle(tokenizer):
    assert tokenizer([]).shape == (0, WORD_LEN)
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone(["closer puppy"]).tolist() == tokenizer(["closer puppy"]).tolist()
