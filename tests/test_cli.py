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


def test_serve_then_sigterm_ends_streams_and_exits_zero():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "blockserve.cli", "serve", "--port", str(port),
                             "--model", "demo:tiny"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not start")
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
