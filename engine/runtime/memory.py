"""What the process really holds: the model's weights, a step's activation peak, MLX's
own counters and the resident set, measured rather than guessed (issue 28).

The scheduler keeps the budget (``scheduler.memory``); this module only measures, on the
engine thread, and applies MLX's own limits (its buffer cache; Metal's wired memory).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

log = logging.getLogger(__name__)

# Share of the machine a server takes by default: of Metal's recommended working set on a
# Mac (vLLM's gpu_memory_utilization is 0.9 of a GPU it owns; a Mac runs other programs
# in the same memory, so less), of physical RAM elsewhere.
DEFAULT_SHARE_METAL = 0.85
DEFAULT_SHARE_RAM = 0.75


def physical_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def default_memory_limit() -> int:
    """A safe share of the memory this process can use: Metal's recommended working set
    on Apple silicon, physical RAM elsewhere."""
    info = mx.device_info() if mx.default_device() == mx.gpu else {}
    working_set = info.get("max_recommended_working_set_size")
    if working_set:
        return int(working_set * DEFAULT_SHARE_METAL)
    return int(physical_ram() * DEFAULT_SHARE_RAM)


def resident_bytes() -> int:
    """The process's resident set: what the machine feels (``/proc`` on Linux; on macOS
    MLX's unified memory, active and cached, which is where a server's bytes are)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
    return mx.get_active_memory() + mx.get_cache_memory()


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def release_freed_memory_to_os() -> bool:
    """glibc keeps freed heap memory resident, and its mmap threshold grows with the
    largest buffer freed, so after a long prompt RSS stays up for good. A fixed
    threshold (256 KiB: per-layer K/V and activations go to mmap and back to the
    system when freed) and a 1 MiB trim threshold keep RSS near what is in use."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def weights_bytes(model: Any) -> int:
    """Bytes of the model's parameters as loaded (quantized weights count their scales)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@dataclass(frozen=True)
class ActivationModel:
    """A step's transient memory beyond its inputs and K/V: ``per_token`` bytes for each
    token it computes (projections, MLP, logits) plus ``per_token_context`` for each
    (token, context token) pair (attention scores). Fitted from two measured forwards."""

    per_token: float
    per_token_context: float

    def peak(self, tokens: int, context: int) -> int:
        return int(self.per_token * tokens + self.per_token_context * tokens * context)


def _measured_forward(model: Any, cache: list[Any], tokens: int) -> int:
    """Peak bytes a forward of ``tokens`` allocates beyond what it leaves behind."""
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = model(mx.zeros((1, tokens), dtype=mx.int32), cache=cache)
    mx.eval(out, [c.state for c in cache])
    after = mx.get_active_memory()
    peak = mx.get_peak_memory() - before
    del out
    return max(peak - (after - before), 0)


def measure_activations(model: Any, tokens: int, repeats: int = 2) -> ActivationModel:
    """Two forwards of ``tokens`` tokens, the second over the first's K/V, give the
    per-token and per-(token x context) terms of a step's activation peak. Each is
    measured ``repeats`` times and the largest peak kept: when buffers are freed depends
    on the backend's threads, so one peak varies (by ~10% on the CPU)."""
    first = second = 0
    for _ in range(repeats):
        cache = make_prompt_cache(model)
        first = max(first, _measured_forward(model, cache, tokens))
        second = max(second, _measured_forward(model, cache, tokens))
        del cache
    mx.clear_cache()
    per_pair = max(second - first, 0) / (tokens * tokens)
    return ActivationModel(first / tokens, per_pair)


def set_buffer_cache_limit(nbytes: int) -> None:
    """Bound MLX's buffer cache: freed arrays it keeps for reuse, otherwise as much as
    the device has. The budget counts this much for it."""
    mx.set_cache_limit(nbytes)


def wire_model_memory() -> int | None:
    """On Metal, wire memory up to the recommended working set so macOS does not page
    the model out. Returns the previous wired limit, to restore on exit (None where
    there is none)."""
    if mx.default_device() != mx.gpu or not mx.metal.is_available():
        return None
    wired = mx.device_info().get("max_recommended_working_set_size")
    return mx.set_wired_limit(int(wired)) if wired else None


def restore_wired_limit(previous: int | None) -> None:
    if previous is not None:
        mx.set_wired_limit(previous)


@dataclass
class EngineMemory:
    """The engine's measurements, read by the scheduler (plain ints, any thread)."""

    weights_bytes: int = 0
    baseline_bytes: int = 0  # resident after load, beyond the weights (runtime, libraries)
    activation: ActivationModel = ActivationModel(0.0, 0.0)
    kv_bytes: int = 0  # running sequences' K/V as allocated (padding and growth included)
    step_peak_bytes: int = 0  # the largest activation peak a step has shown
    mlx_active: int = 0
    mlx_cache: int = 0
    mlx_peak: int = 0
