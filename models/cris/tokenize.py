"""CRIS text tokenization: CLIP's byte-level BPE (open_clip's ``SimpleTokenizer``) with CRIS's length rule (spec §5.3).

Cleaning (open_clip's ``clean="lower"``, identical to the official CLIP/CRIS ``simple_tokenizer``): ``ftfy.fix_text``,
HTML unescaping twice, strip, whitespace runs collapsed to one space, lower case; then CLIP's regex split and BPE
with the bundled ``bpe_simple_vocab_16e6.txt.gz`` (48894 merges, vocabulary 49408). Nothing is downloaded.

Sequence rule (the official ``tokenize(text, word_len, truncate=True)``): ``[SOT=49406] + tokens + [EOT=49407]``,
zero-padded to ``word_len``; a longer sequence is cut to ``word_len`` and its last position overwritten with EOT, so
every row holds exactly one EOT (the largest id, which is how the text encoder finds it with ``argmax``).
``word_len`` is 17 for RefCOCO / RefCOCO+ and 22 for G-Ref.

Gotcha (spec §8.7): padding is id 0, and id 0 is also a real BPE token, the non-word-final piece ``"!"`` (a ``"!"``
directly followed by more punctuation in the same regex chunk, e.g. ``"!;"`` -> ``[0, 282]``; a lone or word-final
``"!"`` is ``"!</w>"`` = 256 and ``"!!"`` is one token, 748). CRIS builds its decoder padding mask as ``tokens == 0``,
so such a token is masked out of the cross-attention (never out of CLIP itself). This module reproduces that; it does
not remap the token.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Union

import torch

SOT, EOT, PAD = 49406, 49407, 0


@lru_cache(maxsize=1)
def tokenizer():
    """The shared open_clip ``SimpleTokenizer`` (the CLIP BPE, ``clean="lower"``)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(clean="lower")
    assert tok.encoder["<start_of_text>"] == SOT and tok.encoder["<end_of_text>"] == EOT
    return tok


def encode(text: str) -> list[int]:
    """The BPE ids of ``text`` after CLIP's cleaning, without SOT / EOT."""
    if not isinstance(text, str):
        raise TypeError(f"encode: 'text' must be a str, got {type(text).__name__}")
    return tokenizer().encode(text)


def tokenize(texts: Union[str, Sequence[str]], word_len: int) -> torch.Tensor:
    """int64 [B, word_len] token ids for ``texts`` (a str gives B = 1) by the rule in the module docstring."""
    if isinstance(word_len, bool) or not isinstance(word_len, int) or word_len < 2:
        raise ValueError(f"tokenize: 'word_len' must be an int >= 2 (room for SOT and EOT), got {word_len!r}")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"tokenize: 'texts' must be a str or a sequence of str, got {type(texts).__name__}")
    out = torch.zeros(len(texts), word_len, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = [SOT] + encode(text) + [EOT]
        if len(ids) > word_len:
            ids = ids[:word_len]
            ids[-1] = EOT
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out
