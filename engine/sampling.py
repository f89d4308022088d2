"""Per-request samplers for ``BatchGenerator``: each sequence in a batch has its own."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from blockserve.scheduler.protocol import SamplingParams

def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """Greedy when temperature is 0 (one shared function, so mlx-lm batches the call).

    A ``seed`` gives the request its own PRNG key chain, so its samples do not depend on
    what else runs in the batch.
    """
    if params.temperature <= 0:
        return greedy
    key = [mx.random.key(params.seed)] if params.seed is not None else None
    inv_temp = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        if params.top_k > 0:
            logprobs = apply_top_k(logprobs, params.top_k)
        if 0.0 < params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0.0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def logits_processors(params: SamplingParams) -> list[Callable]:
    """mlx-lm's processors for the request's penalties and logit bias (none if off)."""
    return make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0
        else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


def token_logprobs(logprobs: mx.array, token: int, top: int
                   ) -> tuple[float, list[tuple[int, float]] | None]:
    """The sampled token's log probability, and the ``top`` most likely tokens."""
    chosen = logprobs[token].item()
    if top <= 0:
        return chosen, None
    ids = mx.argpartition(-logprobs, top - 1)[:top]
    values = logprobs[ids]
    order = mx.argsort(-values)
    return chosen, list(zip(ids[order].tolist(), values[order].tolist()))
