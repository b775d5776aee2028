"""CLIP BPE tokenisation of referring expressions.

Rule (DESIGN.md, "Data"): ``[SOT] + bpe ids + [EOT]``, truncated to ``word_len`` with EOT kept as
the last token, zero padded on the right. The vocabulary is the one OpenAI's CLIP ships
(``bpe_simple_vocab_16e6``), provided by the ``instant-clip-tokenizer`` package.

Text cleaning follows OpenAI's ``basic_clean`` + ``whitespace_clean``: HTML entities unescaped
twice, Unicode NFC normalisation (what ``ftfy.fix_text`` does to well-formed text; ftfy's mojibake
repair is not reproduced), runs of whitespace collapsed, ends stripped. Lower-casing is done by the
BPE encoder itself.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from instant_clip_tokenizer import Tokenizer

SOT_ID = 49406
EOT_ID = 49407
WORD_LEN = 17

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Return ``text`` cleaned the way OpenAI's CLIP tokenizer cleans it before BPE."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip()


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

    def encode(self, text: str, word_len: int = WORD_LEN) -> np.ndarray:
        """One sentence -> ``[word_len]`` int64 ids (SOT, BPE ids, EOT last, zero padding).

        Raises ``ValueError`` naming the sentence when it is empty after cleaning.
        """
        if word_len < 2:
            raise ValueError(f"word_len must be >= 2 to hold SOT and EOT, got {word_len}")
        if not isinstance(text, str):
            raise TypeError(f"sentence must be a str, got {type(text).__name__}: {text!r}")
        bpe_ids = self._bpe.encode(clean_text(text))
        if not bpe_ids:
            raise ValueError(f"empty referring expression {text!r}: nothing to tokenise")
        ids = [SOT_ID, *bpe_ids[: word_len - 2], EOT_ID]
        row = np.zeros(word_len, dtype=np.int64)
        row[: len(ids)] = ids
        return row

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
