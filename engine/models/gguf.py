"""GGUF files (llama.cpp, Ollama, LM Studio) converted once into an mlx-lm directory.

The header is first checked against the file's size, and the float32 conversion's size
against the memory and disk there are (``gguf_check``). llama.cpp's own ``gguf`` package
then reads the file and dequantizes every tensor type it knows (Q4_0 ... Q8_0, the
K-quants, the IQ types) in numpy; the weights are renamed to Hugging Face's names and
brought back to Hugging Face's conventions (the llama family's rotary permutation of Q
and K undone, Gemma's norm weights stored as 1 + w), and the tokenizer is rebuilt from
the metadata with ``tokenizers`` (``gguf_tokenizer``). The result is a normal float32
mlx-lm model directory, loaded by ``mlx_lm.utils.load`` like any other.

Supported: architectures llama, qwen2, qwen3 and gemma3 (text), with a byte-level BPE
("gpt2") or SentencePiece ("llama") tokenizer. Anything else is refused with a message
that names it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from blockserve.engine.models.gguf_check import GGUFError, check_fits, check_header
from blockserve.engine.models.gguf_tokenizer import write_tokenizer

__all__ = ["ARCHS", "GGUF_SOURCE_KEY", "GGUFError", "convert_gguf", "model_config",
           "write_tokenizer"]
log = logging.getLogger(__name__)

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")

# llama.cpp tensor names -> Hugging Face (mlx-lm) names; {} is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 norms both sides of attention and of the MLP: llama.cpp's ffn_norm is the one
# before the MLP there, not the llama family's post-attention norm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# Multimodal Gemma 3 files (Ollama's) carry the vision tower in the same file; the text
# model is served without it (an image in a request is refused by the server).
_VISION_PREFIXES = ("v.", "mm.")
_GEMMA3_27B_LAYERS = 62  # llama.cpp's loader tells the 27B model by this, and so do we
_GEMMA3_SWA_PATTERN = 6  # llama.cpp's fixed value for gemma3: 5 local layers, 1 global
_GEMMA3_LOCAL_ROPE_BASE = 10000.0  # likewise, when the file has no freq_base_swa

GGUF_SOURCE_KEY = "blockserve_gguf"  # in config.json: converted from a GGUF file


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


def _hf_name(name: str, arch: str) -> str | None:
    """The Hugging Face name of llama.cpp's tensor ``name``; None if it has none."""
    layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    base, _, kind = name.rpartition(".")  # kind: weight or bias
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{kind}"
    return None


def _swa_pattern(meta: dict[str, Any], layers: int) -> int:
    """Gemma 3's period of global layers: every Nth layer attends to everything."""
    value = meta.get("gemma3.attention.sliding_window_pattern")
    if value is None:
        return _GEMMA3_SWA_PATTERN
    if isinstance(value, int) and value > 0:
        return value
    # Newer files list, per layer, whether it is a sliding-window one.
    if isinstance(value, list) and len(value) == layers:
        for period in range(1, layers + 1):
            if all(bool(v) == ((i + 1) % period != 0) for i, v in enumerate(value)):
                return period
    raise GGUFError(f"gemma3.attention.sliding_window_pattern {value!r} is not a "
                    "periodic local/global pattern, which mlx-lm's gemma3_text needs")


def _gemma3_config(meta: dict[str, Any], config: dict) -> dict:
    """What Gemma 3 adds to the common config: the local/global attention layout."""
    if meta.get("gemma3.attention.value_length", config["head_dim"]) != config["head_dim"]:
        raise GGUFError("gemma3 with different key and value head sizes is not supported")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta.get(f"gemma3.{key}"):
            raise GGUFError(f"gemma3.{key} (Gemma 2 style soft-capping) is not supported "
                            "by mlx-lm's gemma3_text")
    layers = config["num_hidden_layers"]
    window = int(meta.get("gemma3.attention.sliding_window") or 0)
    scaling = meta.get("gemma3.rope.scaling.type")
    rope_scaling = None
    if scaling == "linear":  # Gemma 3 4B and up: on the global layers only, as mlx-lm
        rope_scaling = {"rope_type": "linear",
                        "factor": float(meta["gemma3.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise GGUFError(f"gemma3 rope scaling {scaling!r} is not supported (linear is)")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        # No window in the file: every layer is global (llama.cpp does the same).
        "sliding_window": window or config["max_position_embeddings"],
        "sliding_window_pattern": _swa_pattern(meta, layers) if window else 1,
        "rope_local_base_freq": float(meta.get("gemma3.rope.freq_base_swa",
                                               _GEMMA3_LOCAL_ROPE_BASE)),
        # Queries are scaled by 1/sqrt(this): the head size, except on the 27B model,
        # where it is hidden size / heads (Google's reference config; llama.cpp's too).
        "query_pre_attn_scalar": (hidden // heads if layers == _GEMMA3_27B_LAYERS
                                  else config["head_dim"]),
        "rope_scaling": rope_scaling,
    }


def _stop_ids(meta: dict[str, Any], arch: str) -> list[int]:
    """EOS, plus the end-of-turn token a Gemma chat ends its turns with."""
    ids = [int(meta["tokenizer.ggml.eos_token_id"])] \
        if "tokenizer.ggml.eos_token_id" in meta else []
    if arch == "gemma3":
        tokens = meta["tokenizer.ggml.tokens"]
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is None and "<end_of_turn>" in tokens:
            eot = tokens.index("<end_of_turn>")
        if eot is not None and int(eot) not in ids:
            ids.append(int(eot))
    return ids


def model_config(meta: dict[str, Any], tied: bool, vocab_size: int | None = None) -> dict:
    """The mlx-lm config.json for a GGUF's metadata; ``vocab_size``: the embedding's rows."""
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
        "vocab_size": vocab_size or len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        GGUF_SOURCE_KEY: True,
    }
    if arch == "gemma3":
        config.update(_gemma3_config(meta, config))
    elif meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not "
                        "supported")
    stops = _stop_ids(meta, arch)
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    return config


def convert_gguf(src: Path, out_dir: Path) -> dict:
    """Write a float32 mlx-lm model directory for the GGUF file ``src``; its config."""
    import mlx.core as mx

    # Every count and size in the header is checked against the file, and the
    # conversion against memory and disk, before the reader believes any of them.
    check_fits(check_header(src), src, out_dir)
    reader = _reader(src)
    meta = _metadata(reader)
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{src}: the file has no tokenizer in its metadata")
    arch = meta.get("general.architecture")
    tensors = [t for t in reader.tensors if not t.name.startswith(_VISION_PREFIXES)]
    if len(tensors) < len(reader.tensors):
        log.info("%s: %d vision tensors left out (text only)", src,
                 len(reader.tensors) - len(tensors))
    by_name = {t.name: t for t in tensors}
    if "rope_freqs.weight" in by_name:
        raise GGUFError("rope frequency factors (Llama 3.1+ rope scaling) are not supported")
    if "token_embd.weight" not in by_name:
        raise GGUFError(f"{src}: the file has no token_embd.weight")
    rows = int(by_name["token_embd.weight"].shape[-1])  # GGUF lists dimensions reversed
    if rows < len(meta["tokenizer.ggml.tokens"]):
        raise GGUFError(f"the vocabulary has {len(meta['tokenizer.ggml.tokens'])} tokens "
                        f"and the embedding {rows} rows")
    config = model_config(meta, tied="output.weight" not in by_name, vocab_size=rows)
    weights = {}
    for t in tensors:
        name = _hf_name(t.name, arch)
        if name is None:
            raise GGUFError(f"tensor {t.name!r} is not one this converter knows")
        w = _dequantize(t)
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads" if "attn_q" in t.name
                           else "num_key_value_heads"]
            w = _unpermute(w, heads)
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            # Gemma's RMSNorm scales by (1 + w); llama.cpp's converter stores 1 + w and
            # multiplies by it, mlx-lm adds the 1 itself.
            w = w - np.float32(1.0)
        weights[name] = mx.array(w)
    if arch == "qwen2" and not any(n.endswith("q_proj.bias") for n in weights):
        raise GGUFError("a qwen2 model needs Q/K/V biases, and this file has none")
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights,
                        metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(meta, out_dir, config["max_position_embeddings"])
    log.info("converted %s: %s, %d layers, %d tensors to float32", src, config["model_type"],
             config["num_hidden_layers"], len(weights))
    return config
