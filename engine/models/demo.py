"""Offline demo models: real mlx-lm architectures, random float32 weights, and a
byte-level BPE tokenizer trained on the spot, and Qwen3's chat template (tools, tool
calls, reasoning), so agents' prompts and replies take the same shape as on a real model.

No model hub is needed: a demo model is a normal mlx-lm model directory, loaded by the
same ``mlx_lm.utils.load`` that loads ``mlx-community/...`` models. Builds are
deterministic for a seed and cached, so a second call returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import _get_classes

FORMAT_VERSION = 3  # bump when a build changes, so cached builds are not reused
DEMO_PREFIX = "demo:"

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Output markers as in Qwen3: plain added tokens (not special), so they survive decoding
# and mlx-lm infers the think markers and the json_tools tool parser from them.
MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
           "</tool_response>")
# Qwen3's chat template, in short: tools in the system turn, tool calls as JSON inside
# <tool_call>, tool results grouped into a user turn, reasoning of the current tool loop
# kept in <think>, and enable_thinking=false opening an empty think block.
CHAT_TEMPLATE = """\
{%- macro text(c) -%}{%- if c is string -%}{{- c -}}{%- elif c -%}\
{%- for p in c -%}{%- if p.text is defined -%}{{- p.text -}}{%- endif -%}{%- endfor -%}\
{%- endif -%}{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- text(messages[0].content) + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + text(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for m in messages[::-1] %}{%- set i = messages|length - 1 - loop.index0 %}
{%- if ns.last_query == messages|length - 1 and m.role == 'user' %}{%- set ns.last_query = i %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = text(message.content) %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role in ['user', 'system', 'developer'] %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content and loop.index0 > ns.last_query %}
{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
{%- endif %}
{{- content }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{%- if loop.first and content or not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""


@dataclass(frozen=True)
class DemoSpec:
    size: str
    arch: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def name(self) -> str:
        return f"{self.size}-{self.arch}"

    def digest(self) -> str:
        blob = json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


SIZES = {
    # A few MB: for tests. Big enough that greedy outputs vary from token to token.
    "tiny": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                 max_position_embeddings=65536),
    # ~80M parameters: for benchmarks.
    "bench": dict(vocab_size=8192, hidden_size=768, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048,
                  max_position_embeddings=65536),
}
# qwen3_next: Gated DeltaNet (ArraysCache) layers with full attention every 2nd layer.
# gemma3_text: sliding-window (RotatingKVCache) layers with a global one every 2nd layer;
# the window is smaller than test prompts, so it wraps.
ARCHS = ("qwen3", "llama", "qwen3_next", "gemma3_text")
SLIDING_WINDOW = {"tiny": 48, "bench": 256}


def demo_spec(size: str = "tiny", arch: str = "qwen3", seed: int = 0) -> DemoSpec:
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose from {sorted(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown demo architecture {arch!r}; choose from {ARCHS}")
    return DemoSpec(size=size, arch=arch, seed=seed, **SIZES[size])


def parse_demo_id(model: str) -> DemoSpec | None:
    """``demo:tiny``, ``demo:bench-llama``, ``demo:tiny-qwen3@7`` (seed 7) -> a spec."""
    if not model.startswith(DEMO_PREFIX):
        return None
    name, _, seed = model[len(DEMO_PREFIX):].partition("@")
    size, _, arch = name.partition("-")
    return demo_spec(size, arch or "qwen3", int(seed) if seed else 0)


def cache_home() -> Path:
    root = os.environ.get("BLOCKSERVE_HOME") or Path.home() / ".cache" / "blockserve"
    return Path(root) / "models"


def model_config(spec: DemoSpec, tok_ids: dict[str, int]) -> dict:
    config = dict(
        model_type=spec.arch,
        architectures=["Qwen3ForCausalLM" if spec.arch == "qwen3" else "LlamaForCausalLM"],
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,  # tied, the argmax copies the input token
        torch_dtype="float32",
        eos_token_id=[tok_ids[IM_END], tok_ids[EOT]],
        bos_token_id=None,
    )
    if spec.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, rope_scaling=None)
    elif spec.arch == "qwen3_next":
        n = spec.num_hidden_layers
        config.update(
            architectures=["Qwen3NextForCausalLM"], full_attention_interval=2,
            linear_num_value_heads=spec.num_attention_heads,
            linear_num_key_heads=spec.num_key_value_heads,
            linear_key_head_dim=spec.head_dim, linear_value_head_dim=spec.head_dim,
            linear_conv_kernel_dim=4, partial_rotary_factor=0.25,
            # Dense MLPs everywhere: the MoE fields are required but unused.
            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
            mlp_only_layers=list(range(n)), moe_intermediate_size=spec.intermediate_size,
            shared_expert_intermediate_size=spec.intermediate_size)
    elif spec.arch == "gemma3_text":
        config.update(
            architectures=["Gemma3ForCausalLM"], sliding_window=SLIDING_WINDOW[spec.size],
            sliding_window_pattern=2, query_pre_attn_scalar=spec.head_dim,
            rope_local_base_freq=10000.0)
    return config


def build_demo_model(spec: DemoSpec, out_dir: Path) -> None:
    """Write a complete mlx-lm model directory for ``spec`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_ids, vocab_size = _train_tokenizer(spec, out_dir)
    # BPE training may stop short of the asked-for size on a small corpus: size the
    # model to the real vocabulary, or it would emit ids that decode to nothing.
    config = {**model_config(spec, tok_ids), "vocab_size": vocab_size}
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    mx.random.seed(spec.seed)

    def init(path: str, p: mx.array) -> mx.array:
        if p.ndim == 1:  # norm scales; any bias would be 0
            return mx.ones_like(p) if path.endswith("weight") else mx.zeros_like(p)
        if "embed" in path:
            # Small enough that the layers' output, not the last token's embedding,
            # leads the residual stream: greedy replies then depend on the context.
            return mx.random.normal(p.shape) * 0.25
        # N(0, 1/fan_in): activations keep their scale, so greedy outputs vary.
        return mx.random.normal(p.shape) * (p.shape[-1] ** -0.5)

    model.update(tree_map_with_path(init, model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "blockserve-demo.json").write_text(
        json.dumps({**asdict(spec), "format": FORMAT_VERSION}, indent=2)
    )


def ensure_demo_model(spec: DemoSpec, home: Path | None = None) -> Path:
    """The cached directory of ``spec``, built on first use (atomically)."""
    home = home or cache_home()
    path = home / f"{spec.name}-s{spec.seed}-{spec.digest()}"
    if (path / "blockserve-demo.json").exists():
        return path
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=home))
    try:
        build_demo_model(spec, tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; its build is identical
            if not (path / "blockserve-demo.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---- tokenizer -------------------------------------------------------------------

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this "
    "have from or one had by word but not what all were we when your can said there "
    "use an each which she do how their if will up other about out many then them these "
    "so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day "
    "did get come made may part system prompt user assistant cache block token model "
    "server request reply tool result error file code function return value list print "
    "import class def self none true false agent turn prefix memory batch stream query"
).split()
_EXTRA = ("café", "naïve", "über", "日本語", "中文", "emoji 🙂", "👍🏽", "Ωμέγα", "привет")
_CODE = ("def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n",
         "if (a && b) { return c; }\n", '{"key": [1, 2, 3], "ok": true}\n')


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(_EXTRA))
        line = " ".join(words)
        if rng.random() < 0.5:
            line = line.capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.1:
            line += " " + str(rng.randint(0, 10**6))
        out.append(line)
        if rng.random() < 0.05:
            out.append(rng.choice(_CODE))
    return out


def _train_tokenizer(spec: DemoSpec, out_dir: Path) -> tuple[dict[str, int], int]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOT, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKERS])
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in specials}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": IM_END,
        "pad_token": EOT,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": IM_END, "pad_token": EOT}, indent=2))
    return ids, tok.get_vocab_size()
