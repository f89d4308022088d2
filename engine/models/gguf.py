"""GGUF files (llama.cpp, Ollama, LM Studio) converted once into an mlx-lm directory.

llama.cpp's own ``gguf`` package reads the file and dequantizes every tensor type it
knows (Q4_0 ... Q8_0, the K-quants, the IQ types) in numpy; the weights are renamed to
Hugging Face's names, the llama family's rotary permutation of Q and K is undone, and
the tokenizer is rebuilt from the metadata with ``tokenizers``. The result is a normal
float32 mlx-lm model directory, loaded by ``mlx_lm.utils.load`` like any other.

Supported: architectures llama, qwen2 and qwen3, with a byte-level BPE tokenizer
("gpt2" in GGUF terms). Anything else is refused with a message that names it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ARCHS = ("llama", "qwen2", "qwen3")
# Pre-tokenizers by GGUF name: a regex split (None: ByteLevel's own) and digit handling.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s"
                 r"\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt2": None, "default": None, "smollm": "digits", "qwen2": _QWEN2_SPLIT,
                  "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# llama.cpp tensor names -> Hugging Face (mlx-lm) names; {} is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}


GGUF_SOURCE_KEY = "blockserve_gguf"  # in config.json: converted from a GGUF file


class GGUFError(ValueError):
    """The file can't be served: not a GGUF, truncated, or an unsupported kind."""


def _reader(path: Path):
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # truncated or corrupt: numpy can't map what the header says
        raise GGUFError(f"{path}: unreadable GGUF ({type(e).__name__}: {e}); is the file "
                        "complete?") from e


def _metadata(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a value type this reader can't decode: not one we use
            continue
    return out


def _dequantize(t) -> np.ndarray:
    """A tensor as float32 in PyTorch's dimension order (GGUF lists them reversed)."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(d) for d in reversed(t.shape))
    try:
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(t.data, dtype=np.float32)
        else:
            data = quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise GGUFError(f"tensor {t.name}: quantization type {t.tensor_type.name} is not "
                        f"supported ({e})") from e
    return np.ascontiguousarray(data.reshape(shape), dtype=np.float32)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows for its rotary layout (llama family)."""
    out, rest = w.shape[0], w.shape[1:]
    return (w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2)
            .reshape(out, *rest))


def _hf_name(name: str) -> str | None:
    base, _, kind = name.rpartition(".")  # kind: weight or bias
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def model_config(meta: dict[str, Any], tied: bool) -> dict:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"architecture {arch!r} is not supported (supported: "
                        f"{', '.join(ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(f"the metadata has no {arch}.{key}")
        return v

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        GGUF_SOURCE_KEY: True,
    }
    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not "
                        "supported")
    if "tokenizer.ggml.eos_token_id" in meta:
        config["eos_token_id"] = int(meta["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    return config


def write_tokenizer(meta: dict[str, Any], out_dir: Path, max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json from the GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, \
        processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer model {kind!r} is not supported (only byte-level BPE, "
                        "'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"pre-tokenizer {pre!r} is not supported (supported: "
                        f"{', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
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
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
            special_tokens=[(bos, tokens.index(bos))])
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": token("eos"), "unk_token": token("unknown"),
              "pad_token": token("padding"), "add_bos_token": add_bos,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def convert_gguf(src: Path, out_dir: Path) -> dict:
    """Write a float32 mlx-lm model directory for the GGUF file ``src``; its config."""
    import mlx.core as mx

    reader = _reader(src)
    meta = _metadata(reader)
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{src}: the file has no tokenizer in its metadata")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError("rope frequency factors (Llama 3.1+ rope scaling) are not supported")
    config = model_config(meta, tied="output.weight" not in names)
    weights = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise GGUFError(f"tensor {t.name!r} is not one this converter knows")
        w = _dequantize(t)
        if config["model_type"] == "llama" and t.name.endswith(("attn_q.weight",
                                                                "attn_k.weight")):
            heads = config["num_attention_heads" if "attn_q" in t.name
                           else "num_key_value_heads"]
            w = _unpermute(w, heads)
        weights[name] = mx.array(w)
    if config["model_type"] == "qwen2" and not any(n.endswith("q_proj.bias") for n in weights):
        raise GGUFError("a qwen2 model needs Q/K/V biases, and this file has none")
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights,
                        metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(meta, out_dir, config["max_position_embeddings"])
    log.info("converted %s: %s, %d layers, %d tensors to float32", src, config["model_type"],
             config["num_hidden_layers"], len(weights))
    return config
