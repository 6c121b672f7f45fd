"""Offline tokenizers for the tiny test models, built from in-memory vocabularies.

Owns nothing else. The vocabularies are deliberately small (a character-level byte BPE for CLIP and
a 140-piece unigram for T5/UMT5) so that no tokenizer file has to be downloaded or shipped; the
builder saves them with ``save_pretrained`` and every role then loads them with the ordinary
``from_pretrained(local_dir)`` path, exactly as real tokenizers would load.
"""

from __future__ import annotations

from transformers import CLIPTokenizer, T5Tokenizer

# CLIP's pooler takes the hidden state at the first position holding the eos id, so the text
# encoder config built next to this tokenizer must use the same id (1).
CLIP_BOS_ID = 0
CLIP_EOS_ID = 1
T5_PAD_ID = 0
T5_EOS_ID = 1

_T5_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


def make_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Char-level byte BPE: 514 ids, no merges, bos=0, eos=pad=1."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


def make_t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """Unigram: 140 pieces, pad=0, eos=1, unk=2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -2.0) for c in _T5_ALPHABET]
    pieces += [(c, -3.0) for c in _T5_ALPHABET]
    pieces += [("\u2581", -1.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
