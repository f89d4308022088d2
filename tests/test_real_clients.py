"""Real coding agents against the server: Claude Code (Anthropic API), OpenCode
(OpenAI API) and Codex (OpenAI Responses API) from npm, two turns each on a tiny demo
model (Codex's scripted to call a tool), with no workaround variables. Each must exit 0
with no API error, and its second turn must be served from the cache through the
system prompt and the tool list.

The clients are installed once into ~/.cache/blockserve/clients (pinned versions). If
npm itself can't be reached the tests skip, and say so loudly."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from blockserve.engine.runtime.worker import EngineWorker
from blockserve.engine.text.structured import ToolCallFormat
from blockserve.kvpool import TIER_SYSTEM
from mlx_lm.tokenizer_utils import load as load_tokenizer

from blockserve.engine.models.loader import resolve
from tests.server_harness import serve, serve_scripted

CLIENTS = {"@anthropic-ai/claude-code": "2.1.330", "opencode-ai": "1.18.33"}
CODEX = {"@openai/codex": "0.171.0"}  # its own folder: the others stay installed
MODEL = "demo:tiny"
HOME = Path(os.environ.get("BLOCKSERVE_HOME") or Path.home() / ".cache" / "blockserve")


def _install(clients: dict[str, str] = CLIENTS,
             names: tuple[str, ...] = ("claude", "opencode")) -> Path:
    root = HOME / "clients" / "-".join(f"{k.split('/')[-1]}{v}" for k, v in clients.items())
    bins = root / "node_modules" / ".bin"
    if all((bins / b).exists() for b in names):
        return bins
    npm = shutil.which("npm")
    if npm is None:
        _loud_skip("npm is not installed")
    probe = subprocess.run([npm, "view", next(iter(clients)), "version"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        _loud_skip(f"npm can't reach its registry: {probe.stderr.strip()[-300:]}")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(root),
                    *(f"{k}@{v}" for k, v in clients.items())],
                   check=True, capture_output=True, timeout=600)
    return bins


def _loud_skip(why: str):
    msg = f"REAL CLIENTS NOT TESTED: {why}"
    print(f"\n{'!' * 80}\n{msg}\n{'!' * 80}", file=sys.stderr)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def bins():
    return _install()


@pytest.fixture(scope="module")
def worker():
    w = EngineWorker(MODEL, block_size=16, max_running=4)
    yield w
    w.close()


class Recorder:
    """Every request the server admits, with its final usage (what the agent got)."""

    def __init__(self, scheduler, frontend):
        self.streams = []
        submit = scheduler.submit

        def recording_submit(req):
            stream = submit(req)
            self.streams.append((req, stream))
            return stream

        scheduler.submit = recording_submit
        self.tools: list[dict] = []  # the tool lists the client sent, as rendered
        render = frontend.render_chat

        def recording_render(messages, tools=None, *args):
            if tools:
                self.tools = tools
            return render(messages, tools, *args)

        frontend.render_chat = recording_render

    def mark(self) -> int:
        return len(self.streams)

    def since(self, mark: int):
        return [(req, stream._state.usage) for req, stream in self.streams[mark:]]


async def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "API Error" not in text and "APIError" not in text, text[-2000:]
    return text


def _system_end(req) -> int:
    """Where the prompt's system part (system prompt and tool list) ends."""
    return max((t for t, tier in req.checkpoints if tier == TIER_SYSTEM), default=0)


def _check_tools_can_be_forced(frontend, tools):
    """A forced tool choice over the client's real tools compiles: the grammar engine
    takes every schema these agents send."""
    assert len(tools) >= 5, [t.get("function", t).get("name") for t in tools]
    frontend.constrain(ToolCallFormat(tuple(tools), None, True))
    for t in tools:
        frontend.constrain(ToolCallFormat(tuple(tools), t["function"]["name"]))


def _check_second_turn(first, second):
    assert first and second, "each turn sends at least one request"
    main = max(first, key=lambda r: len(r[0].prompt))[0]  # the agent's turn, not a title
    system_end = _system_end(main)
    assert system_end > 1000  # a real agent's system prompt and tools
    best = max(usage.cached_tokens for _, usage in second)
    assert best >= system_end // 16 * 16, (best, system_end)


def _env(tmp: Path, **extra) -> dict:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TERM")}
    return {**keep, "HOME": str(home), **extra}


async def test_claude_code_two_turns(bins, worker, tmp_path):
    async with serve(worker) as srv:
        rec = Recorder(srv.scheduler, srv.frontend)
        env = _env(tmp_path, ANTHROPIC_BASE_URL=srv.url, ANTHROPIC_API_KEY="unused")
        claude = str(bins / "claude")
        work = tmp_path / "project"
        work.mkdir()
        await _run([claude, "-p", "List the files here.", "--model", MODEL], work, env)
        turn1 = rec.since(0)
        mark = rec.mark()
        await _run([claude, "-p", "Now say hi.", "--continue", "--model", MODEL], work, env)
        _check_second_turn(turn1, rec.since(mark))
        _check_tools_can_be_forced(srv.frontend, rec.tools)
        assert srv.scheduler.pool.stats().blocks_pinned == 0


async def test_opencode_two_turns(bins, worker, tmp_path):
    async with serve(worker) as srv:
        rec = Recorder(srv.scheduler, srv.frontend)
        work = tmp_path / "project"
        work.mkdir()
        (work / "opencode.json").write_text(json.dumps({
            "$schema": "https://opencode.ai/config.json",
            "provider": {"blockserve": {
                "npm": "@ai-sdk/openai-compatible", "name": "blockserve",
                "options": {"baseURL": srv.url + "/v1", "apiKey": "unused"},
                "models": {MODEL: {"name": MODEL,
                                   "limit": {"context": 65536, "output": 256}}}}},
            "model": f"blockserve/{MODEL}"}))
        # OpenCode installs the provider package from npm on first use: keep its cache.
        env = _env(tmp_path, XDG_CACHE_HOME=str(HOME / "clients" / "opencode-cache"))
        opencode = str(bins / "opencode")
        await _run([opencode, "run", "List the files here."], work, env)
        turn1 = rec.since(0)
        mark = rec.mark()
        await _run([opencode, "run", "--continue", "Now say hi."], work, env)
        _check_second_turn(turn1, rec.since(mark))
        _check_tools_can_be_forced(srv.frontend, rec.tools)
        assert srv.scheduler.pool.stats().blocks_pinned == 0


CODEX_SCRIPTS = [  # the model's replies: a call of Codex's shell tool, then answers
    '<think>\nRun it.\n</think>\n\n<tool_call>\n{"name": "exec_command", "arguments": '
    '{"cmd": "echo blockserve-ok"}}\n</tool_call>',
    "It printed blockserve-ok.",
    "Hi."]


@pytest.fixture(scope="module")
def codex():
    return _install(CODEX, ("codex",)) / "codex"


async def test_codex_two_turns(codex, tmp_path):
    """``codex exec`` runs the command the model calls and returns its output to the
    model; ``codex exec resume --last`` is served from the cache."""
    tokenizer = load_tokenizer(Path(resolve(MODEL)[1]))
    async with serve_scripted(tokenizer, MODEL, CODEX_SCRIPTS, max_context=1 << 17,
                              default_max_tokens=512) as (url, _, sched, frontend):
        rec = Recorder(sched, frontend)
        env = _env(tmp_path, CODEX_HOME=str(tmp_path / "home" / ".codex"))
        (tmp_path / "home" / ".codex").mkdir(parents=True)
        work = tmp_path / "project"
        work.mkdir()
        provider = f'{{name="bs",base_url="{url}/v1",wire_api="responses"}}'
        # No sandbox: CI containers may lack the user namespaces bubblewrap needs, and
        # what is tested here is the server, not Codex's sandbox.
        cmd = [str(codex), "exec", "-m", MODEL, "--skip-git-repo-check",
               "-s", "danger-full-access", "-c", "model_provider=bs",
               "-c", f"model_providers.bs={provider}"]
        out1 = await _run(cmd + ["List the files here."], work, env)
        turn1 = rec.since(0)
        mark = rec.mark()
        out2 = await _run(cmd + ["resume", "--last", "Now say hi."], work, env)
        turn2 = rec.since(mark)
        assert "It printed blockserve-ok." in out1 and "Hi." in out2.split("user")[-1]
        assert len(turn1) == 2 and len(turn2) == 1, (len(turn1), len(turn2))
        answered = tokenizer.decode(turn1[1][0].prompt)  # the command's output came back
        assert "<tool_response>" in answered and "blockserve-ok" in answered.split(
            "<tool_response>")[-1]
        _check_second_turn(turn1, turn2)
        (_, usage), = turn2
        assert usage.cached_tokens >= 0.9 * usage.prompt_tokens, usage
        _check_tools_can_be_forced(frontend, rec.tools)
