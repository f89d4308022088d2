"""A real process restart with ``--disk-cache-dir``: the second server answers the first
one's prompt from disk, with the same greedy text; stats, metrics and reset see it."""

import json
import os
import signal
import urllib.request

from tests.test_cli import post, start


def chat(url: str, content: str) -> dict:
    code, reply, _ = post(url + "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "You are a careful agent. " * 20},
                     {"role": "user", "content": content}],
        "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert code == 200, reply
    return reply


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def test_a_restarted_server_hits_the_disk_cache(tmp_path):
    d = str(tmp_path / "kv")
    args = ("--model", "demo:tiny", "--disk-cache-dir", d, "--disk-cache-bytes", "64MiB")
    proc, url = start(*args)
    try:
        first = chat(url, "Read the file and print it.")
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        out = stop(proc)
    assert "disk cache at" in out and "budget 0.06 GiB" in out
    assert any(f.endswith(".kv") for _, _, fs in os.walk(d) for f in fs)

    proc, url = start(*args)
    try:
        again = chat(url, "Read the file and print it.")
        assert again["choices"][0]["message"]["content"] == \
            first["choices"][0]["message"]["content"]
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (again["usage"]["prompt_tokens"] - 1) // 16 * 16 > 0
        with urllib.request.urlopen(url + "/v1/cache/stats", timeout=10) as r:
            disk = json.loads(r.read())["disk"]
        assert disk["hit_tokens"] == cached and disk["files"] > 0
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert f'blockserve_disk_cache_tokens_total{{result="hit"}} {float(cached)}' in metrics
        code, body, _ = post(url + "/v1/cache/reset", {})
        assert code == 200, body
        with urllib.request.urlopen(url + "/v1/cache/stats", timeout=10) as r:
            assert json.loads(r.read())["disk"]["files"] == 0
    finally:
        stop(proc)
