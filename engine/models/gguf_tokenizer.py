"""Tokenizers rebuilt from a GGUF file's metadata with Hugging Face ``tokenizers``.

Two GGUF tokenizer models are mapped:

- ``gpt2``: byte-level BPE (Qwen, Llama 3, SmolLM): the vocabulary, the merges and the
  pre-tokenizer's split regex, chosen by ``tokenizer.ggml.pre``.
- ``llama``: SentencePiece (Gemma, Mistral, Llama 2). GGUF keeps the pieces, their
  scores and types, not the merges: SentencePiece's BPE merges the adjacent pair whose
  joined piece scores highest, so the merge list is every split of a normal piece into
  two normal pieces, ranked by the joined piece's score. Spaces are written ``▁``
  (with a leading one when ``add_space_prefix``), characters outside the vocabulary
  fall back to ``<0xXX>`` byte pieces, and control and user-defined pieces are matched
  whole in the text, as llama.cpp does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from blockserve.engine.models.gguf_check import GGUFError

log = logging.getLogger(__name__)

# Pre-tokenizers by GGUF name: a regex split (None: ByteLevel's own) and digit handling.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s"
                 r"\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt2": None, "default": None, "smollm": "digits", "qwen2": _QWEN2_SPLIT,
                  "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}
# llama.cpp's token types (SentencePiece's, plus BYTE).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space, ▁
KINDS = ("gpt2", "llama")


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> Any:
    """A ``gpt2`` (byte-level BPE) tokenizer: its model, pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"pre-tokenizer {pre!r} is not supported (supported: "
                        f"{', '.join(sorted(PRE_TOKENIZERS))})")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    split = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None
                                          or split == "digits")
    if split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], types: list[int], scores: list[float]
               ) -> list[tuple[str, str]]:
    """SentencePiece BPE as a ranked merge list: each split of a normal piece into two
    normal pieces, the best-scoring joined piece first (ties: the lower ids first)."""
    normal: dict[str, int] = {}
    for i, (t, k) in enumerate(zip(tokens, types)):
        if k == NORMAL:
            normal.setdefault(t, i)
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = normal.get(piece[:cut]), normal.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((-scores[i], left, right))
    ranked.sort()
    return [(tokens[a], tokens[b]) for _, a, b in ranked]


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    """A ``llama`` (SentencePiece) tokenizer: BPE with byte fallback over ▁-spaced text."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFError("a SentencePiece ('llama') tokenizer needs a score per token, and "
                        "tokenizer.ggml.scores is missing or of the wrong length")
    if not any(k == BYTE for k in types):
        raise GGUFError("a SentencePiece vocabulary without <0xXX> byte pieces (no byte "
                        "fallback) is not supported")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated piece keeps its first id, as SentencePiece
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) \
        else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, types, scores),
                               unk_token=unk, byte_fallback=True, fuse_unk=True))
    # llama.cpp's default for SentencePiece vocabularies is a dummy prefix; Gemma's
    # files say add_space_prefix = false.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = (normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix
                      else replace)
    # These exact steps are what mlx-lm recognises as a SentencePiece decoder (for its
    # streaming detokenizer); the strip undoes the dummy prefix.
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def write_tokenizer(meta: dict[str, Any], out_dir: Path, max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json from the GGUF metadata."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta["tokenizer.ggml.tokens"]
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"tokenizer.ggml.token_type has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens)
    elif kind == "llama":
        tok = _sentencepiece(meta, tokens, types)
    else:
        raise GGUFError(f"tokenizer model {kind!r} is not supported (supported: "
                        "byte-level BPE 'gpt2', SentencePiece 'llama')")
    # Control pieces (<bos>, <start_of_turn>, ...) are special: matched in templates'
    # text and skipped when decoding for display. User-defined pieces (Gemma's runs of
    # newlines, spaces and tabs, HTML tags) are matched whole in the raw text: llama.cpp
    # writes them with plain spaces.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    # llama.cpp adds BOS by default to SentencePiece vocabularies, not to byte-level BPE.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) \
        and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first = f"{bos}:0 " if add_bos else ""
        last = f" {eos}:0" if add_eos else ""
        specials = ([(bos, tokens.index(bos))] if add_bos else []) + (
            [(eos, tokens.index(eos))] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first}$A:0{last}", pair=f"{first}$A:0{last} $B:1{last}",
            special_tokens=specials)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": eos, "unk_token": token("unknown"),
              "pad_token": token("padding"), "add_bos_token": add_bos,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    if add_eos:
        config["add_eos_token"] = True
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
