"""The real command line: ``blockserve serve`` starts, serves, and exits 0 on SIGTERM
while a stream is in flight."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
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


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def stream_completion(url: str, max_tokens: int):
    body = json.dumps({"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)


def test_sigterm_drains_running_streams_and_refuses_new_ones():
    """A rolling restart loses nothing: a stream in flight at SIGTERM completes with its
    real finish reason, while health says draining and new requests get a 503."""
    proc, url = start("--model", "demo:tiny", "--drain-timeout", "60")
    try:
        # ~2000 tokens take seconds to stream; the checks below take milliseconds, and
        # the last one asserts the stream was still running after them.
        with stream_completion(url, 2000) as stream:
            assert stream.readline().startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while True:  # until the server has seen the signal
                try:
                    urllib.request.urlopen(url + "/health", timeout=5)
                except urllib.error.HTTPError as e:
                    assert e.code == 503
                    break
                assert time.monotonic() < deadline, "health never said draining"
                time.sleep(0.01)
            code, err, headers = post(url + "/v1/completions", {"prompt": "Hi",
                                                                "max_tokens": 2})
            assert code == 503 and headers["Retry-After"] == "5"
            assert err["error"]["code"] == "shutting_down"
            with urllib.request.urlopen(url + "/get_load", timeout=5) as r:
                load = json.loads(r.read())
            assert load["num_running_reqs"] == 1, "the stream ended before the checks"
            rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        assert '"finish_reason": "length"' in rest and "abort" not in rest
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "draining 1 running" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_then_sigterm_past_the_drain_timeout_aborts_and_exits_zero():
    proc, url = start("--model", "demo:tiny", "--drain-timeout", "0.5")
    try:
        with stream_completion(url, 5000) as stream:
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


def test_the_inputs_that_crashed_the_process_are_400s_and_slow_headers_are_cut():
    """The ids that segfaulted the process (issue 18) in a real server process: each is a
    400, the server still serves and exits 0. A connection whose headers never end is
    closed after --idle-timeout."""
    proc, url = start("--model", "demo:tiny", "--idle-timeout", "2")
    try:
        for ids in ([2147483647], [1030], [-1], [2**31], [2**63]):
            code, err, _ = post(url + "/v1/completions", {"prompt": ids, "max_tokens": 1})
            assert code == 400 and "vocabulary" in err["error"]["message"], err
        code, err, _ = post(url + "/detokenize", {"tokens": [2147483647]})
        assert code == 400
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.settimeout(20)
            t0 = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the server, not by our timeout
            assert time.monotonic() - t0 < 15
        code, ok, _ = post(url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
        assert code == 200 and ok["choices"][0]["finish_reason"] in ("length", "stop")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()


# A server whose engine thread dies at its first step (the test's doing, not a hook in
# the production class): every request fails, health says so, and the process exits 1.
_DYING = """
import sys
from blockserve.engine.runtime.worker import EngineWorker
def die(self):
    raise SystemExit("the engine thread died")
EngineWorker._step = die
from blockserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_when_the_engine_thread_dies_the_process_exits_nonzero():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _DYING, "serve", "--port", str(port),
                             "--model", "demo:tiny"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        code, err, _ = post(url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
        assert code == 500 and "engine stopped" in err["error"]["message"]
        assert proc.wait(30) == 1
        assert "exiting: the engine stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
