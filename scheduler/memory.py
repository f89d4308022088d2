"""One memory limit for the whole process, and how it is split (issue 28).

    limit = weights + baseline + activation reserve + MLX buffer cache + KV
    KV    = running requests' K/V (first) + the prefix cache (whatever they leave)

Weights, the baseline (the runtime and libraries, resident after load) and a step's
activation peak are measured by the engine; the rest of the limit is K/V. Running
sequences take K/V as they grow, not ``prompt + max_tokens`` up front, and the prefix
cache's budget is what they leave: it shrinks as they grow (evicting, to the disk tier
when there is one) and grows back when they end. When the running sequences alone
would pass the limit, the scheduler preempts (``scheduler.Scheduler``).

No MLX here: the numbers come in, a plan comes out.
"""

from __future__ import annotations

from dataclasses import dataclass

# mlx-lm's KVCache grows in steps of 256 positions, so a sequence's K/V is allocated in
# whole steps: count it so.
KV_ALLOC_STEP = 256


@dataclass
class MemoryBudget:
    limit_bytes: int
    weights_bytes: int = 0
    baseline_bytes: int = 0
    activation_bytes: int = 0  # reserve for the largest step the engine may take
    buffer_cache_bytes: int = 0  # freed buffers MLX keeps for reuse (its cache limit)
    kv_bytes_per_token: int = 0
    step_tokens: int = 256  # the most K/V positions one step adds to the running set
    cache_cap_bytes: int | None = None  # --kv-cache-memory-bytes: a cap inside the limit
    running_cap_bytes: int | None = None  # --active-kv-memory-bytes: likewise

    @property
    def kv_bytes(self) -> int:
        """What the limit leaves for K/V, running and cached together."""
        return max(self.limit_bytes - self.weights_bytes - self.baseline_bytes
                   - self.activation_bytes - self.buffer_cache_bytes, 0)

    @property
    def margin_bytes(self) -> int:
        """Kept free for one step's growth: its new positions and one allocation step."""
        return (self.step_tokens + KV_ALLOC_STEP) * self.kv_bytes_per_token

    @property
    def running_limit_bytes(self) -> int:
        """The most running requests' K/V may take."""
        room = max(self.kv_bytes - self.margin_bytes, 0)
        return room if self.running_cap_bytes is None else min(room, self.running_cap_bytes)

    def sequence_bytes(self, tokens: int) -> int:
        """A sequence of ``tokens`` positions (and the one it computes next), as allocated."""
        steps = -(-(tokens + 1) // KV_ALLOC_STEP)
        return steps * KV_ALLOC_STEP * self.kv_bytes_per_token

    def running_bytes(self, n: int, longest: int) -> int:
        """``n`` running sequences' K/V as a decode batch allocates it: every row padded
        to the ``longest`` (left padding), in whole allocation steps. Sequences that
        prefill or speculate in caches of their own hold less: an upper bound."""
        return n * self.sequence_bytes(longest) if n else 0

    def admits(self, running_bytes: int, pinned_bytes: int) -> bool:
        """Whether running requests' K/V (a new one's included) and the cache's pinned
        blocks (its hit's included) fit: unpinned cached blocks can be evicted."""
        return (running_bytes <= self.running_limit_bytes and
                running_bytes + pinned_bytes <= self.kv_bytes - self.margin_bytes)

    def over(self, running_bytes: int, cache_bytes: int) -> bool:
        """Whether running requests and the cache (after eviction) pass the limit."""
        return not self.admits(running_bytes, cache_bytes)

    def pressure(self, resident_bytes: int) -> str | None:
        """Why new requests are refused (the process is over its limit), or None."""
        if resident_bytes <= self.limit_bytes:
            return None
        return (f"the server is over its memory limit: {resident_bytes / 2**20:.0f} MiB "
                f"resident of {self.limit_bytes / 2**20:.0f} MiB")

    def cache_budget(self, running_bytes: int) -> int:
        """The prefix cache's share while ``running_bytes`` run."""
        room = max(self.kv_bytes - self.margin_bytes - running_bytes, 0)
        return room if self.cache_cap_bytes is None else min(room, self.cache_cap_bytes)

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"memory limit {self.limit_bytes / gib:.2f} GiB = weights "
                f"{self.weights_bytes / gib:.2f} + runtime {self.baseline_bytes / gib:.2f} + "
                f"activations {self.activation_bytes / gib:.2f} + MLX buffer cache "
                f"{self.buffer_cache_bytes / gib:.2f} + KV {self.kv_bytes / gib:.2f} "
                f"(running first, up to {self.running_limit_bytes / gib:.2f}; the prefix "
                f"cache takes what they leave"
                + ("" if self.cache_cap_bytes is None else
                   f", at most {self.cache_cap_bytes / gib:.2f}") + ")")
