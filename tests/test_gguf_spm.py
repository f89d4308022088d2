"""SentencePiece ("llama") tokenizers rebuilt from GGUF metadata, against Google's
``sentencepiece`` library itself (a dependency of mlx-lm).

- Llama 2 / Mistral style (a dummy prefix space, byte fallback): a BPE model trained
  here by sentencepiece, its pieces written to GGUF metadata as llama.cpp's converter
  writes them, rebuilt by blockserve and compared with the trained model.
- Gemma 3 (no prefix space, user-defined runs of spaces and newlines, a 262k vocab):
  the real file's vocabulary, loaded into sentencepiece as a model, against the
  tokenizer blockserve converted from that file.

Both encode the same ids and decode back to the text (spaces, newlines, tabs, emoji,
scripts outside the vocabulary, control bytes) the way SentencePiece does.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from blockserve.engine.models.gguf import GGUFError, write_tokenizer
from blockserve.engine.models.gguf_tokenizer import SPACE, USER_DEFINED

TEXTS = [
    "Hello world",
    "the cache keeps blocks",
    " leading space", "   three leading spaces", "trailing spaces   ", "a  b   c    d",
    "tabs\tand\t\ttabs", "new\nline", "two\n\nnewlines\n\n\nand three\n", "\n", " \n \n",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧 and 🦜",
    "café naïve Ångström", "日本語のテキストと中文", "Ꙭ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd",
    "control bytes \x00\x01\x07\x1b\x7f end",
    "def f(x):\n    return x ** 2  # square\n",
    "<table><tr><td>1</td></tr></table> and <b>bold</b>",
    "1234567890 3.14159 -42 1e-9",
    "▁ already a visible space ▁▁",
    "",
]


# ---- Llama 2 style: a model trained here ------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[spm.SentencePieceProcessor, Path]:
    """(sentencepiece's model, blockserve's tokenizer directory built from its GGUF
    metadata): Llama 2's settings, a dummy prefix and byte fallback."""
    rng = random.Random(0)
    words = ("the cache keeps blocks of tokens for every request and the scheduler "
             "shares them across users, 12 times; café").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    # What llama.cpp's converter writes for a Llama 2 tokenizer.model.
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.bos_token_id": proto.trainer_spec.bos_id,
        "tokenizer.ggml.eos_token_id": proto.trainer_spec.eos_id,
        "tokenizer.ggml.unknown_token_id": proto.trainer_spec.unk_id,
    }
    out = tmp_path_factory.mktemp("spm")
    write_tokenizer(meta, out, 4096)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()), out


def _tokenizer(path: Path) -> Any:
    from mlx_lm.tokenizer_utils import load

    return load(path)


def test_llama_style_ids_and_text_equal_sentencepiece(trained):
    sp, path = trained
    tok = _tokenizer(path)
    for text in TEXTS:
        want = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == want, text
        assert tok.decode(want) == sp.decode(want), text
        # A literal ▁ is SentencePiece's own escape: it decodes as a space there too.
        assert SPACE in text or tok.decode(want) == text, text


def test_llama_style_bos_and_streaming_detokenizer(trained):
    """BOS is added (llama.cpp's default for SentencePiece), the leading space comes
    off again, and mlx-lm's streaming detokenizer gives the same text piece by piece."""
    sp, path = trained
    tok = _tokenizer(path)
    ids = tok.encode("the cache 🙂 keeps")
    assert ids[0] == sp.bos_id() and ids[1:] == sp.encode("the cache 🙂 keeps")
    detok = tok.detokenizer
    detok.reset()
    for i in ids[1:]:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "the cache 🙂 keeps"


def test_a_vocabulary_without_byte_pieces_or_scores_is_refused(trained, tmp_path):
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "b"],
            "tokenizer.ggml.token_type": [2, 1, 1]}
    with pytest.raises(GGUFError, match="score per token"):
        write_tokenizer(meta, tmp_path, 16)
    with pytest.raises(GGUFError, match="byte fallback"):
        write_tokenizer({**meta, "tokenizer.ggml.scores": [0.0, -1.0, -2.0]}, tmp_path, 16)
    with pytest.raises(GGUFError, match="tokenizer model 'rwkv' is not supported"):
        write_tokenizer({**meta, "tokenizer.ggml.model": "rwkv"}, tmp_path, 16)


# ---- Gemma 3: the real file's vocabulary ------------------------------------------


@pytest.fixture(scope="module")
def gemma_pair(gemma3_file: Path) -> tuple[spm.SentencePieceProcessor, object, Path]:
    """(sentencepiece loaded with the GGUF's pieces, blockserve's converted tokenizer,
    the converted directory)."""
    from gguf import GGUFReader

    from blockserve.engine.models.builtin import ensure_gguf_model

    fields = GGUFReader(gemma3_file).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    unk = int(fields["tokenizer.ggml.unknown_token_id"].contents())
    proto = pb.ModelProto()
    for i, (t, s, k) in enumerate(zip(tokens, scores, types)):
        piece = proto.pieces.add()
        # llama.cpp's converter wrote user-defined pieces with plain spaces; in the
        # SentencePiece model they are matched on the ▁-escaped text.
        piece.piece = t.replace(" ", SPACE) if k == USER_DEFINED else t
        piece.score = s
        piece.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else k
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    spec = proto.trainer_spec
    for kind in ("unk", "bos", "eos", "pad"):  # ids and names: SentencePiece asks both
        key = {"unk": "unknown", "pad": "padding"}.get(kind, kind)
        i = int(fields[f"tokenizer.ggml.{key}_token_id"].contents())
        setattr(spec, f"{kind}_id", i)
        setattr(spec, f"{kind}_piece", tokens[i])
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(
        fields["tokenizer.ggml.add_space_prefix"].contents())
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    converted = ensure_gguf_model(gemma3_file)
    return sp, _tokenizer(converted), converted


@pytest.mark.heavy
def test_gemma_ids_and_text_equal_sentencepiece(gemma_pair):
    sp, tok, _ = gemma_pair
    for text in TEXTS:
        if SPACE in text:
            # SentencePiece can't tell a typed ▁ from an escaped space, so its
            # user-defined "▁▁" matches "▁ "; llama.cpp (and blockserve) match Gemma's
            # user-defined runs of spaces on the raw text. They differ only here.
            continue
        want = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == want, text
        assert tok.decode(want) == sp.decode(want), text
        assert SPACE in text or tok.decode(want) == text, text
    # Runs of spaces and newlines are Gemma's user-defined pieces, whole.
    assert len(tok.encode("a" + " " * 8 + "b" + "\n" * 5, add_special_tokens=False)) == 4


@pytest.mark.heavy
def test_gemma_bos_and_turn_markers(gemma_pair):
    """<bos> comes first (add_bos_token); Gemma's turn markers in a template's text are
    single control tokens, as llama.cpp parses them."""
    sp, tok, tok_dir = gemma_pair
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>", add_special_tokens=True)
    start, end = (tok.convert_tokens_to_ids(t) for t in ("<start_of_turn>",
                                                          "<end_of_turn>"))
    assert ids == [sp.bos_id(), start, *sp.encode("user\nHi"), end]
    # A chat turn's end stops generation: mlx-lm takes the stop ids from config.json.
    config = json.loads((tok_dir / "config.json").read_text())
    assert config["eos_token_id"] == [sp.eos_id(), end]
