"""GGUF conversion, without the wheel: small quantized GGUFs written here with llama.cpp's
``gguf`` package, for the llama and qwen3 layouts. The converted weights match an
independent numpy dequantization, and the converted model generates the tokens of the
same weights loaded directly by mlx-lm. Bad files are clear errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from blockserve.engine.models.demo import demo_spec, ensure_demo_model
from blockserve.engine.models.gguf import GGUFError, convert_gguf
from tests.engine_harness import reference_tokens

Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
# Gemma 3 norms before and after attention and the MLP (llama.cpp's names).
GEMMA3_TO_GGUF = {**HF_TO_GGUF, "post_attention_layernorm": "post_attention_norm",
                  "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}


# ---- an independent dequantization (the GGML block formats, written out) ----------


def ref_dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    blocks = raw.reshape(-1)
    if qtype == Q.Q8_0:  # f16 scale, 32 int8
        b = blocks.reshape(-1, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].copy().view(np.int8).astype(np.float32)
        out = d * q
    elif qtype in (Q.Q4_0, Q.Q4_1):  # f16 scale (and min), 16 bytes of two nibbles
        size = 18 if qtype == Q.Q4_0 else 20
        b = blocks.reshape(-1, size)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        nib = b[:, size - 16:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32)
        if qtype == Q.Q4_0:
            out = (q - 8) * d
        else:
            out = q * d + b[:, 2:4].copy().view(np.float16).astype(np.float32)
    else:
        raise AssertionError(qtype)
    return out.reshape(shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order for its rotary layout (llama family)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def qtype_for(name: str) -> Q:
    if name.endswith("norm.weight"):
        return Q.F32
    if "embed" in name:
        return Q.Q8_0  # as SmolLM2: a Q8_0 embedding, Q4_1 elsewhere
    return Q.Q4_1 if "mlp" in name else Q.Q4_0


def write_gguf(model_dir: Path, out: Path, pre: str = "gpt2", arch: str | None = None,
               tensor_type: Q | None = None) -> dict[str, np.ndarray]:
    """The demo model as a quantized GGUF; returns the reference float weights (HF
    names and order) that the file holds."""
    config = json.loads((model_dir / "config.json").read_text())
    gemma = config["model_type"] == "gemma3_text"
    arch = arch or ("gemma3" if gemma else config["model_type"])
    weights = {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    w = gguf.GGUFWriter(str(out), arch)
    w.add_uint32(f"{arch}.block_count", config["num_hidden_layers"])
    w.add_uint32(f"{arch}.context_length", config["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", config["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", config["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", config["num_attention_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", config["num_key_value_heads"])
    w.add_uint32(f"{arch}.attention.key_length", config["head_dim"])
    w.add_float32(f"{arch}.rope.freq_base", config["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    if arch == "gemma3":
        w.add_uint32("gemma3.attention.sliding_window", config["sliding_window"])
        w.add_uint32("gemma3.attention.sliding_window_pattern",
                     config["sliding_window_pattern"])
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    added = {t["content"]: (t["id"], t["special"]) for t in tok["added_tokens"]}
    vocab.update({t: i for t, (i, _) in added.items()})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [3 if added.get(t, (0, False))[1] else 4 if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_chat_template(json.loads((model_dir / "tokenizer_config.json").read_text())
                        ["chat_template"])
    reference = {}
    for name, value in weights.items():
        value = value.astype(np.float32)
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            base, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{(GEMMA3_TO_GGUF if gemma else HF_TO_GGUF)[base]}.{kind}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        stored = value
        if arch == "gemma3" and name.endswith("norm.weight"):
            stored = value + 1  # llama.cpp's converter stores Gemma's 1 + w
        if arch == "llama" and base_is(name, ("q_proj", "k_proj")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            stored = permute(value, heads)
        qtype = tensor_type or qtype_for(name)
        if qtype == Q.F32:
            w.add_tensor(gname, stored)
            deq = stored
        elif qtype == Q.I32:  # a type no one dequantizes
            w.add_tensor(gname, stored.astype(np.int32))
            deq = None
        else:
            raw = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gname, raw, raw_dtype=qtype)
            deq = ref_dequantize(raw, qtype, stored.shape) if qtype in (
                Q.Q8_0, Q.Q4_0, Q.Q4_1) else None
        if arch == "gemma3" and name.endswith("norm.weight"):
            deq = value  # F32: the stored 1 + w, less 1
        if deq is not None and arch == "llama" and base_is(name, ("q_proj", "k_proj")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            deq = unpermute_ref(deq, heads)
        reference[name] = deq
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def base_is(name: str, parts: tuple[str, ...]) -> bool:
    return any(f".{p}." in name for p in parts)


def unpermute_ref(w: np.ndarray, n_head: int) -> np.ndarray:
    # The inverse of ``permute``, written independently: row r of head h was taken from
    # position (h, i, j) -> (h, j, i).
    rows = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(rows // 2):
            for j in range(2):
                out[h * rows + j * (rows // 2) + i] = w[h * rows + i * 2 + j]
    return out


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3_text"])
def converted(request, tmp_path_factory):
    """(demo model dir, GGUF path, converted dir, reference weights) per layout."""
    tmp = tmp_path_factory.mktemp(request.param)
    src = ensure_demo_model(demo_spec("tiny", request.param, seed=5))
    path = tmp / "model.gguf"
    reference = write_gguf(src, path)
    out = tmp / "converted"
    convert_gguf(path, out)
    return src, path, out, reference


def test_weights_match_an_independent_dequantization(converted):
    _, _, out, reference = converted
    got = {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}
    assert set(got) == set(reference)
    for name, ref in reference.items():
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], ref, rtol=0, atol=1e-6, err_msg=name)


def test_greedy_tokens_equal_the_same_weights_loaded_by_mlx_lm(converted, tmp_path):
    src, _, out, reference = converted
    direct = tmp_path / "direct"
    shutil.copytree(src, direct)
    mx.save_safetensors(str(direct / "model.safetensors"),
                        {k: mx.array(v) for k, v in reference.items()})
    model_a, tok_a = load(str(out))
    model_b, tok_b = load(str(direct))
    msgs = [{"role": "system", "content": "You read files."},
            {"role": "user", "content": "Open the file 12 and print 3.5 values, café!"}]
    prompt_a = tok_a.apply_chat_template(msgs, add_generation_prompt=True)
    prompt_b = tok_b.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt_a == prompt_b  # the tokenizer rebuilt from the metadata agrees
    tokens = reference_tokens(model_a, prompt_a, 16)
    assert tokens == reference_tokens(model_b, prompt_b, 16)
    assert len(set(tokens)) > 4
    assert tok_a.decode(tokens) == tok_b.decode(tokens)


def test_k_quants_are_read():
    """Most GGUFs in the wild are K-quants (Q4_K_M, Q6_K): the converter takes every
    type gguf's numpy dequantizers know. A Q4_K block with scale 1, min 0, all 6-bit
    sub-scales 1 and every nibble 3 holds 3.0 everywhere."""
    from types import SimpleNamespace

    from blockserve.engine.models.gguf import _dequantize

    block = np.zeros(144, dtype=np.uint8)
    block[:2] = np.array([1.0], dtype=np.float16).view(np.uint8)  # d
    block[4:8] = 1  # scales of sub-blocks 0-3; 8-11 hold 4-7's low bits
    block[12:16] = 0x01  # sub-blocks 4-7: scale low nibble 1, min 0
    block[16:] = 0x33
    t = SimpleNamespace(name="blk.0.ffn_up.weight", tensor_type=Q.Q4_K,
                        shape=np.array([256, 1]), data=block.reshape(1, 144))
    w = _dequantize(t)
    assert w.shape == (1, 256) and np.allclose(w, 3.0)


def _bad(tmp_path, content: bytes) -> Path:
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    return p


def test_bad_files_are_clear_errors(converted, tmp_path):
    src, good, _, _ = converted
    data = good.read_bytes()
    with pytest.raises(GGUFError, match="not a GGUF file"):
        convert_gguf(_bad(tmp_path, b"PK\x03\x04" + data[4:]), tmp_path / "a")
    with pytest.raises(GGUFError, match="unreadable GGUF|is the file complete"):
        convert_gguf(_bad(tmp_path, data[: len(data) // 2]), tmp_path / "b")
    mamba = tmp_path / "mamba.gguf"
    write_gguf(src, mamba, arch="mamba")
    with pytest.raises(GGUFError, match="architecture 'mamba' is not supported"):
        convert_gguf(mamba, tmp_path / "c")
    ints = tmp_path / "ints.gguf"
    write_gguf(src, ints, tensor_type=Q.I32)
    with pytest.raises(GGUFError, match="quantization type I32 is not supported"):
        convert_gguf(ints, tmp_path / "e")
    with pytest.raises(GGUFError, match="pre-tokenizer 'tekken' is not supported"):
        tek = tmp_path / "tek.gguf"
        write_gguf(src, tek, pre="tekken")
        convert_gguf(tek, tmp_path / "d")


def test_the_cli_refuses_a_bad_file_without_a_traceback(tmp_path):
    bad = _bad(tmp_path, b"not a model at all")
    done = subprocess.run([sys.executable, "-m", "blockserve.cli", "serve", "--model",
                           str(bad), "--port", "0"], capture_output=True, text=True,
                          timeout=120, env={"BLOCKSERVE_HOME": str(tmp_path / "home"),
                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "not a GGUF file" in done.stderr and "Traceback" not in done.stderr


def test_weights_are_chosen_by_device(converted, monkeypatch):
    """float32 on the CPU backend; 4-bit on a GPU, or anywhere with
    BLOCKSERVE_GGUF_4BIT=1 (MLX's quantized matmul also runs on the CPU, slowly). The
    4-bit weights are the float32 ones on their group's grid, and the model's
    logits stay near the float32 model's without equalling them (greedy tokens of the
    4-bit engine against a 4-bit reference: tests/test_exactness.py)."""
    import mlx.nn as nn

    from blockserve.engine.models.loader import GGUF_4BIT_ENV, load_weights, quantize_gguf

    _, _, out, _ = converted
    assert json.loads((out / "config.json").read_text())["blockserve_gguf"] is True
    monkeypatch.delenv(GGUF_4BIT_ENV, raising=False)
    assert quantize_gguf() == (mx.default_device() == mx.gpu)
    monkeypatch.setenv(GGUF_4BIT_ENV, "1")
    assert quantize_gguf()
    gpu = load_weights(str(out))
    monkeypatch.setenv(GGUF_4BIT_ENV, "0")
    cpu = load_weights(str(out))
    monkeypatch.setenv(GGUF_4BIT_ENV, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        quantize_gguf()
    assert not cpu.quantized and gpu.quantized
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in cpu.model.named_modules())
    quantized = {n: m for n, m in gpu.model.named_modules()
                 if isinstance(m, nn.QuantizedLinear)}
    assert quantized
    floats = dict(cpu.model.named_modules())
    for name, q in quantized.items():
        w = floats[name].weight
        back = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
        # 16 levels per group: within one step (the group's scale) of each weight (MLX
        # fits the grid so zero is on it, so not always the nearest level).
        step = mx.abs(mx.repeat(q.scales, q.group_size, axis=-1))
        err = mx.abs(back - w)
        assert mx.all(err <= step * 1.001 + 1e-6).item(), name
        assert mx.any(err > 0).item(), name  # really 4 bits: not the float32 weights
    tokens = gpu.tokenizer.encode("Open the file 12 and print 3.5 values")
    lq = np.array(gpu.model(mx.array([tokens]))[0])
    lf = np.array(cpu.model(mx.array([tokens]))[0])
    # A random tiny model is sensitive to its weights (here 0.26 of the logits' spread
    # on average, correlation 0.94); float32 would give 0 and 1.
    diff = np.abs(lq - lf).mean() / lf.std()
    assert 0 < diff < 0.5, diff
    assert np.corrcoef(lq.ravel(), lf.ravel())[0, 1] > 0.85


def _gemma3_meta(**extra) -> dict:
    """Gemma 3 1B's metadata, as llama.cpp's converter writes it."""
    return {"general.architecture": "gemma3", "gemma3.block_count": 26,
            "gemma3.context_length": 32768, "gemma3.embedding_length": 1152,
            "gemma3.feed_forward_length": 6912, "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
            "gemma3.attention.value_length": 256, "gemma3.rope.freq_base": 1e6,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
            "gemma3.attention.sliding_window": 512,
            "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<end_of_turn>"],
            "tokenizer.ggml.eos_token_id": 1, **extra}


def test_gemma3_config_from_metadata():
    from blockserve.engine.models.gguf import model_config

    c = model_config(_gemma3_meta(), tied=True)
    assert (c["model_type"], c["sliding_window"], c["sliding_window_pattern"]) == (
        "gemma3_text", 512, 6)  # llama.cpp's fixed period when the file has none
    assert (c["rope_theta"], c["rope_local_base_freq"]) == (1e6, 10000.0)
    assert c["query_pre_attn_scalar"] == 256 and c["rope_scaling"] is None
    assert c["eos_token_id"] == [1, 3]  # <end_of_turn> ends a chat turn
    # The file's own local base and period; a per-layer list of sliding flags.
    flags = [(i + 1) % 4 != 0 for i in range(26)]
    c = model_config(_gemma3_meta(**{"gemma3.rope.freq_base_swa": 5e4,
                                     "gemma3.attention.sliding_window_pattern": flags}),
                     tied=True)
    assert (c["rope_local_base_freq"], c["sliding_window_pattern"]) == (5e4, 4)
    # 27B (62 layers): queries scaled by hidden / heads; linear rope scaling (global).
    c = model_config(_gemma3_meta(**{"gemma3.block_count": 62,
                                     "gemma3.embedding_length": 5376,
                                     "gemma3.attention.head_count": 32,
                                     "gemma3.rope.scaling.type": "linear",
                                     "gemma3.rope.scaling.factor": 8.0}), tied=True)
    assert c["query_pre_attn_scalar"] == 168
    assert c["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    # No window: every layer global.
    c = model_config(_gemma3_meta(**{"gemma3.attention.sliding_window": 0}), tied=True)
    assert c["sliding_window_pattern"] == 1


@pytest.mark.parametrize("extra, message", [
    ({"gemma3.final_logit_softcapping": 30.0}, "soft-capping"),
    ({"gemma3.rope.scaling.type": "yarn"}, "rope scaling 'yarn' is not supported"),
    ({"gemma3.attention.value_length": 128}, "different key and value head sizes"),
    ({"gemma3.attention.sliding_window_pattern": [False] + [True] * 25},
     "not a periodic local/global pattern"),
])
def test_gemma3_metadata_that_cannot_be_mapped_is_refused(extra, message):
    from blockserve.engine.models.gguf import model_config

    with pytest.raises(GGUFError, match=message):
        model_config(_gemma3_meta(**extra), tied=True)
