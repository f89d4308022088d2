"""The real command line: ``blockserve serve`` starts, serves, and exits 0 on SIGTERM
while a stream is in flight."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from blockserve.cli import parse_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512mb") == 512 << 20
    assert parse_bytes("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_bytes("lots")


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """``blockserve serve`` on a free port, once it answers /health."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "blockserve.cli", "serve", "--port",
                             str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stdout.read()}")
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start")


def test_the_default_model_is_real_and_answers():
    """No --model: SmolLM2-135M-Instruct, fetched and converted offline from its GGUF."""
    proc, url = start()
    try:
        body = json.dumps({"messages": [{"role": "user",
                                         "content": "What is the capital of France?"}],
                           "max_tokens": 20, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        assert reply["model"] == "SmolLM2-135M-Instruct"
        assert "Paris" in reply["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_serve_then_sigterm_ends_streams_and_exits_zero():
    proc, url = start("--model", "demo:tiny")
    try:
        body = json.dumps({"prompt": "Hello", "max_tokens": 5000, "ignore_eos": True,
                           "stream": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as stream:
            first = stream.readline()
            assert first.startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)
            rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        assert '"finish_reason": "abort"' in rest
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "BLAS" in out and "block size 16" in out  # the start-up line
    finally:
        if proc.poll() is None:
            proc.kill()
