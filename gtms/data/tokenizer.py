"""CLIP BPE tokenisation of referring expressions, id for id what OpenAI's CLIP tokenizer gives.

Rule (DESIGN.md, "Data"): ``[SOT] + bpe ids + [EOT]``, truncated to ``word_len`` with EOT kept as
the last token, zero padded on the right. The vocabulary is the one OpenAI's CLIP ships
(``bpe_simple_vocab_16e6``), provided by the ``instant-clip-tokenizer`` package; the steps
around it are OpenAI's ``simple_tokenizer`` (which CRIS copies):

1. ``basic_clean``: ``ftfy.fix_text`` (curly quotes, ligatures, full-width letters, mojibake,
   control characters, HTML entities), then ``html.unescape`` twice, then strip;
2. ``whitespace_clean``: runs of whitespace (the ``regex`` module's ``\\s``) -> one space, strip;
3. lower-case (Python's ``str.lower``);
4. split into words with OpenAI's case-insensitive pattern (the literal ``<|startoftext|>`` /
   ``<|endoftext|>`` become the SOT / EOT ids), BPE per word.

``instant-clip-tokenizer`` alone does none of step 1-2 and splits with a different pattern
(special markers ``<start_of_text>``, case-sensitive contractions), so this module splits the
words itself and hands the tokenizer one word at a time.

A sentence with more tokens than ``word_len`` is cut (EOT kept last); :meth:`ClipTokenizer.
encode_counted` says how many it had, so callers can report it.

An expression that is empty after cleaning (``""``, whitespace, ``&nbsp;``) becomes
``[SOT, EOT]`` as in CRIS; :func:`is_empty_expression` tells the pipeline which sentences those
are (training skips them, evaluation scores them).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import ftfy
import numpy as np
import regex
from instant_clip_tokenizer import Tokenizer

SOT_ID = 49406
EOT_ID = 49407
WORD_LEN = 17
# CLIP's text context: the most tokens (SOT and EOT included) any data.word_len lets through.
CONTEXT_LENGTH = 77

# OpenAI's simple_tokenizer, verbatim pattern and flags.
_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")
_SPECIAL = {"<|startoftext|>": (SOT_ID,), "<|endoftext|>": (EOT_ID,)}
# The only words OpenAI's case-insensitive pattern yields that instant-clip-tokenizer would split
# differently (checked over every lower-case code point: U+017F LONG S is the one character that
# case-folds onto a letter of the fixed alternatives). Their ids are what OpenAI's tokenizer gives
# for the whole word.
_FOLDED = {
    "'\u017f": (6, 129, 379),
    "<|\u017ftartoftext|>": (27, 91, 129, 123, 2002, 6659, 18169, 91, 285),
}


def shortened(text: str, limit: int = 80) -> str:
    """``text`` as a console line shows it: whole up to ``limit`` characters, else its first
    ``limit`` and "…"."""
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def clean_text(text: str) -> str:
    """``text`` after OpenAI's ``basic_clean`` and ``whitespace_clean`` (not lower-cased)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


def words(text: str) -> list[str]:
    """The words OpenAI's tokenizer runs BPE on: cleaned, lower-cased, split."""
    return _WORDS.findall(clean_text(text).lower())


def is_empty_expression(text: str) -> bool:
    """True when ``text`` has no token after cleaning (it tokenises to ``[SOT, EOT]``)."""
    return not words(text)


class ClipTokenizer:
    """Sentences -> CLIP token ids ``[B, word_len]`` int64.

    Build it once per process (e.g. in a Ray Data actor's ``__init__``): the BPE vocabulary is
    loaded in the constructor. Pickling re-creates it on the other side instead of shipping the
    native tokenizer object.
    """

    def __init__(self) -> None:
        self._bpe = Tokenizer()
        if (self._bpe.start_of_text(), self._bpe.end_of_text()) != (SOT_ID, EOT_ID):
            raise RuntimeError(
                "instant_clip_tokenizer does not use CLIP's special ids "
                f"SOT={SOT_ID}, EOT={EOT_ID}: got {self._bpe.start_of_text()}, "
                f"{self._bpe.end_of_text()}"
            )

    def __reduce__(self):
        return (ClipTokenizer, ())

    def bpe_ids(self, text: str) -> list[int]:
        """One sentence -> its BPE ids without SOT/EOT (OpenAI's ``SimpleTokenizer.encode``)."""
        if not isinstance(text, str):
            raise TypeError(f"sentence must be a str, got {type(text).__name__}: {text!r}")
        ids: list[int] = []
        for word in words(text):
            fixed = _SPECIAL.get(word) or _FOLDED.get(word)
            ids.extend(fixed if fixed is not None else self._bpe.encode(word))
        return ids

    def encode(self, text: str, word_len: int = WORD_LEN) -> np.ndarray:
        """One sentence -> ``[word_len]`` int64 ids (SOT, BPE ids, EOT last, zero padding).

        A sentence that is empty after cleaning gives ``[SOT, EOT, 0, ...]``.
        """
        return self.encode_counted(text, word_len)[0]

    def encode_counted(self, text: str, word_len: int = WORD_LEN) -> tuple[np.ndarray, int]:
        """:meth:`encode`'s row and how many tokens the sentence has before it is cut to
        ``word_len`` (SOT and EOT included): more than ``word_len`` means truncated."""
        if word_len < 2:
            raise ValueError(f"word_len must be >= 2 to hold SOT and EOT, got {word_len}")
        bpe = self.bpe_ids(text)
        ids = [SOT_ID, *bpe[: word_len - 2], EOT_ID]
        row = np.zeros(word_len, dtype=np.int64)
        row[: len(ids)] = ids
        return row, len(bpe) + 2

    def __call__(self, texts: Sequence[str], word_len: int = WORD_LEN) -> np.ndarray:
        """Sentences ``[B]`` -> ids ``[B, word_len]`` int64.

        ``texts`` must be a sequence of strings (a bare ``str`` is refused, since iterating it
        would tokenise single characters).
        """
        if isinstance(texts, str):
            raise TypeError("ClipTokenizer expects a sequence of sentences, not a single str")
        if word_len < 2:
            raise ValueError(f"word_len must be >= 2 to hold SOT and EOT, got {word_len}")
        out = np.zeros((len(texts), word_len), dtype=np.int64)
        for b, text in enumerate(texts):
            out[b] = self.encode(text, word_len)
        return out
