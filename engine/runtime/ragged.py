"""One forward pass over a ragged batch: several sequences' tokens, any count each.

The tokens of all sequences (one decode token each, or a prefill chunk) are laid out
as one row each of a ``[T, hidden]`` matrix, so the projections, norms and MLP read
the weights once for all of them; attention alone runs per sequence, over that
sequence's own mlx-lm ``KVCache`` (rope at its offset, ``update_and_fetch``, causal
within the chunk). The modules are mlx-lm's own; only the layer loop is ours, so a
family is covered when its layers have the plain pre-norm shape (llama, mistral,
qwen2, qwen3, gemma). Everything else falls back to mlx-lm's ``BatchGenerator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

# mlx-lm model modules whose layers are ``h = x + attn(norm(x)); h + mlp(norm(h))``
# with q/k/v/o projections, an optional per-head q/k norm, and rope by offset.
FAMILIES = {"llama", "qwen2", "qwen3", "gemma"}
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "scale", "n_heads",
                    "n_kv_heads")


def family(model: Any) -> str:
    """The mlx-lm module a model comes from (``llama`` for mistral too)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def supports(model: Any, caches: Sequence[Any]) -> bool:
    """Whether the ragged forward reproduces ``model``'s own forward."""
    if family(model) not in FAMILIES or not all(type(c) is KVCache for c in caches):
        return False
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        return False
    for layer in layers:
        if getattr(layer, "use_sliding", False):  # llama's sliding-window layers
            return False
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in _ATTENTION_PARTS):
            return False
        if not all(hasattr(layer, p) for p in ("input_layernorm", "post_attention_layernorm",
                                                "mlp")):
            return False
    return True


@dataclass
class Span:
    """One sequence's rows in the ragged batch, and its per-layer caches."""

    start: int
    length: int
    caches: list[KVCache]


@dataclass
class Decodes:
    """The first ``size`` rows: one decode token each of the sequences whose caches are
    batched (mlx-lm's left-padded ``BatchKVCache``, one per layer), attended in one
    call exactly as mlx-lm's batched decode does."""

    size: int
    caches: list[BatchKVCache]


def _attention(attn: Any, x: mx.array, decodes: Decodes | None, spans: Sequence[Span],
               layer: int) -> mx.array:
    """mlx-lm's attention, projections over all rows, attention per span."""
    t = x.shape[0]
    q = attn.q_proj(x).reshape(t, attn.n_heads, -1)
    k = attn.k_proj(x).reshape(t, attn.n_kv_heads, -1)
    v = attn.v_proj(x).reshape(t, attn.n_kv_heads, -1)
    if hasattr(attn, "q_norm"):  # qwen3: RMS norm per head, before rope
        q, k = attn.q_norm(q), attn.k_norm(k)
    outs = []
    if decodes is not None:
        n, cache = decodes.size, decodes.caches[layer]
        # [n, heads, dim] -> [n, heads, 1, dim]: a batch of one-token queries
        qs, ks, vs = (a[:n][:, :, None, :] for a in (q, k, v))
        qs = attn.rope(qs, offset=cache.offset)  # per-row offsets
        ks = attn.rope(ks, offset=cache.offset)
        mask = cache.make_mask(1)  # before the update, as the model's forward makes it
        ks, vs = cache.update_and_fetch(ks, vs)
        o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=attn.scale, mask=mask)
        outs.append(o.reshape(n, -1))
    for s in spans:
        a, b = s.start, s.start + s.length
        cache = s.caches[layer]
        # [n, heads, dim] -> [1, heads, n, dim], the layout mlx-lm's caches hold
        qs = q[a:b].transpose(1, 0, 2)[None]
        ks = k[a:b].transpose(1, 0, 2)[None]
        vs = v[a:b].transpose(1, 0, 2)[None]
        qs = attn.rope(qs, offset=cache.offset)
        ks = attn.rope(ks, offset=cache.offset)
        ks, vs = cache.update_and_fetch(ks, vs)
        # "causal" aligns the chunk's queries to the end of the keys, as mlx-lm does
        mask = "causal" if s.length > 1 else None
        o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=attn.scale, mask=mask)
        outs.append(o[0].transpose(1, 0, 2).reshape(s.length, -1))
    return attn.o_proj(outs[0] if len(outs) == 1 else mx.concatenate(outs))


def forward(model: Any, tokens: Sequence[int], decodes: Decodes | None,
            spans: Sequence[Span], rows: Sequence[int]) -> mx.array | None:
    """Logits ``[len(rows), vocab]`` at the given rows after feeding the decode tokens
    and every span's tokens
    (``tokens[span.start : span.start + span.length]``) through its caches; None when
    no row is asked for (the caches' update is still to evaluate)."""
    inner = model.model
    h = inner.embed_tokens(mx.array(tokens, dtype=mx.uint32))
    if family(model) == "gemma":
        h = h * (inner.args.hidden_size**0.5)  # as gemma.py scales its embeddings
    for i, layer in enumerate(inner.layers):
        r = _attention(layer.self_attn, layer.input_layernorm(h), decodes, spans, i)
        h = h + r
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    if not rows:
        return None
    # Only the rows that are sampled go through the final norm and the head: a
    # prefill chunk's other rows would cost a [chunk, vocab] matmul for nothing.
    h = inner.norm(h[mx.array(rows, dtype=mx.uint32)] if len(rows) < h.shape[0] else h)
    if hasattr(model, "lm_head"):
        return model.lm_head(h)
    return inner.embed_tokens.as_linear(h)
