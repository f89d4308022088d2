"""Loading a model with mlx-lm, and what the rest of blockserve needs to know about it."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load

from blockserve.engine.models.builtin import BUILTIN_MODEL, ensure_builtin_model, ensure_gguf_model
from blockserve.engine.models.gguf import GGUF_SOURCE_KEY
from blockserve.engine.models.demo import ensure_demo_model, parse_demo_id
from blockserve.engine.runtime.kvblocks import CacheLayout

DEFAULT_MODEL = BUILTIN_MODEL
log = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model's cache layout can't be served with block-level prefix reuse yet."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any  # mlx_lm TokenizerWrapper
    model_id: str  # what clients name in "model"
    model_path: str  # the local directory or hub id mlx-lm loaded
    identity: str  # model id + revision + dtype + a weights digest: the cache namespace
    layout: CacheLayout
    kv_bytes_per_token: int  # attention layers only; state layers are a per-request constant
    max_context: int
    eos_token_ids: frozenset[int]
    vocab_size: int  # rows of the embedding: valid token ids are [0, vocab_size)


def resolve(model: str | None) -> tuple[str, str]:
    """(model id shown to clients, path or hub id for mlx-lm): the built-in model, a
    demo model, a GGUF file (converted once), or a directory or hub id as it is."""
    model = model or DEFAULT_MODEL
    if model == BUILTIN_MODEL:
        return model, str(ensure_builtin_model())
    spec = parse_demo_id(model)
    if spec is not None:
        return model, str(ensure_demo_model(spec))
    if model.lower().endswith(".gguf"):
        return Path(model).name[: -len(".gguf")], str(ensure_gguf_model(model))
    return model, model


# "1": quantize a GGUF's weights to 4 bits whatever the device (tests prove the GPU's
# path on the CPU with it); "0": keep them in float32 everywhere; unset: the device
# decides (``quantize_gguf``). Read only there.
GGUF_4BIT_ENV = "BLOCKSERVE_GGUF_4BIT"


def quantize_gguf() -> bool:
    """Whether a GGUF's weights are quantized to 4 bits here: on a GPU (Apple silicon),
    where memory bandwidth decides, unless ``BLOCKSERVE_GGUF_4BIT`` says otherwise;
    on the CPU backend they stay float32 (MLX's quantized matmul is ~10x slower there)."""
    forced = os.environ.get(GGUF_4BIT_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{GGUF_4BIT_ENV} must be 0 or 1, not {forced!r}")
    return mx.default_device() == mx.gpu


def weights_for_device(net: Any, model_id: str, gpu: bool | None = None) -> bool:
    """A GGUF's weights, converted to float32: quantized to 4 bits in place when
    ``gpu`` (default: ``quantize_gguf()``), kept as they are otherwise. True if
    quantized."""
    gpu = quantize_gguf() if gpu is None else gpu
    if gpu:
        nn.quantize(net, group_size=64, bits=4)
        log.info("%s: GGUF weights quantized to 4 bits", model_id)
    else:
        log.info("%s: GGUF weights kept in float32, the fast path on the CPU backend",
                 model_id)
    return gpu


@dataclass
class Weights:
    """A model as loaded for serving: what ``load_model`` builds on, and what every
    reference (mlx-lm's own generation in the tests, tools) must load, so both see the
    same weights on every device."""

    model_id: str
    path: str
    model: Any
    tokenizer: Any
    config: dict
    quantized: bool  # a GGUF's weights quantized to 4 bits on load


def load_weights(model: str | None = None, revision: str | None = None,
                 quantize: bool | None = None) -> Weights:
    """The model's weights exactly as the engine serves them on this device (a GGUF's
    quantized to 4 bits or not: ``quantize``, by default ``quantize_gguf()``)."""
    model_id, path = resolve(model)
    net, tokenizer, config = load(path, revision=revision, return_config=True)
    quantized = (bool(config.get(GGUF_SOURCE_KEY))
                 and weights_for_device(net, model_id, gpu=quantize))
    return Weights(model_id, path, net, tokenizer, config, quantized)


def load_model(model: str | None = None, revision: str | None = None) -> LoadedModel:
    w = load_weights(model, revision)
    model_id, path, net, tokenizer, config = w.model_id, w.path, w.model, w.tokenizer, w.config
    caches = make_prompt_cache(net)
    try:
        layout = CacheLayout.of(caches)
    except TypeError as e:
        raise UnsupportedModelError(f"{model_id}: {e}; supported are KVCache, ArraysCache "
                                    "and RotatingKVCache layers") from e
    # One token through the model gives the K/V shapes and the vocabulary without
    # parsing configs.
    vocab_size = int(net(mx.array([[0]]), cache=caches).shape[-1])
    kv = [caches[i] for i in layout.kv_layers]
    per_token = sum(
        (c.keys.shape[1] * c.keys.shape[3] + c.values.shape[1] * c.values.shape[3])
        * c.keys.dtype.size
        for c in kv
    )
    dtype = str(tree_flatten(net.parameters())[0][1].dtype)
    if w.quantized:  # other weights, other KV: never one cache namespace with float32
        dtype += "-q4g64"
    local = Path(path)
    digest = ""
    if (local / "config.json").exists():
        digest = hashlib.sha256((local / "config.json").read_bytes()).hexdigest()[:12]
        weights = sorted(local.glob("*.safetensors"))
        digest += "-" + "-".join(f"{w.stat().st_size}" for w in weights)
    identity = f"{model_id}@{revision or 'main'}:{dtype}:{digest}"
    max_context = int(
        config.get("max_position_embeddings")
        or (config.get("text_config") or {}).get("max_position_embeddings")
        or 4096
    )
    return LoadedModel(
        model=net,
        tokenizer=tokenizer,
        model_id=model_id,
        model_path=path,
        identity=identity,
        layout=layout,
        kv_bytes_per_token=per_token,
        max_context=max_context,
        eos_token_ids=frozenset(tokenizer.eos_token_ids),
        vocab_size=vocab_size,
    )

