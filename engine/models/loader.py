"""Loading a model with mlx-lm, and what the rest of blockserve needs to know about it."""

from __future__ import annotations

import hashlib
import logging
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


def weights_for_device(net: Any, model_id: str, gpu: bool | None = None) -> None:
    """A GGUF's weights, converted to float32, kept so on the CPU backend (MLX's
    quantized matmul is ~10x slower there) and quantized to 4 bits on a GPU (Apple
    silicon), where memory bandwidth decides."""
    gpu = mx.default_device() == mx.gpu if gpu is None else gpu
    if gpu:
        nn.quantize(net, group_size=64, bits=4)
        log.info("%s: GGUF weights quantized to 4 bits for the GPU", model_id)
    else:
        log.info("%s: GGUF weights kept in float32, the fast path on the CPU backend",
                 model_id)


def load_model(model: str | None = None, revision: str | None = None) -> LoadedModel:
    model_id, path = resolve(model)
    net, tokenizer, config = load(path, revision=revision, return_config=True)
    if config.get(GGUF_SOURCE_KEY):
        weights_for_device(net, model_id)
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

