"""bench.long_prompt's windows and statistics, on synthetic timestamps (no model)."""

import pytest

from blockserve.bench.long_prompt import _verdict, step_profile, window_gaps, window_report


def test_a_gap_belongs_to_the_window_its_second_token_arrives_in():
    arrivals = {"a": [0.0, 1.0, 2.0, 5.0, 6.0], "b": [0.5, 1.5, 4.5]}
    # (1, 4.5]: the gaps that end at a's 2.0, b's 1.5 and b's 4.5
    assert sorted(window_gaps(arrivals, 1.0, 4.5)) == [1.0, 1.0, 3.0]
    assert window_gaps(arrivals, 6.0, 9.0) == []
    assert sorted(window_gaps(arrivals, -1.0, 1.0)) == [1.0]  # a's first gap only


def test_window_report_ratios():
    # Two streams decoding every 0.1 s; from t=2 to t=4 a long prompt stretches their
    # gaps to 0.2 s (the one in flight at t=2 included); after t=4, 0.1 s again.
    def stream(offset_ms):
        t, out = offset_ms, []
        while t < 6000:
            out.append(t / 1000)
            t += 200 if 2000 <= t < 4000 else 100
        return out

    arrivals = {"s0": stream(0), "s1": stream(50)}
    r = window_report(arrivals, {"t_warm": 0.5, "t_submit": 2.0, "t_first": 4.0,
                                 "t_end": 6.0})
    w = r["windows"]
    assert w["baseline"]["p99_s"] == pytest.approx(0.1)
    assert w["long_prompt"]["p50_s"] == pytest.approx(0.2)
    assert w["long_prompt"]["count"] == 20
    assert r["p99_ratio"] == pytest.approx(2.0)
    assert r["p50_ratio"] == pytest.approx(2.0)
    assert w["after"]["max_s"] == pytest.approx(0.2)  # s1's gap that ends after t=4


def test_an_empty_window_has_no_ratio():
    r = window_report({"s": [0.0, 1.0, 2.0]}, {"t_warm": 0.0, "t_submit": 2.0,
                                               "t_first": 2.0, "t_end": 2.0})
    assert r["windows"]["long_prompt"]["count"] == 0
    assert r["p99_ratio"] is None and r["after_p99_ratio"] is None


def test_step_profile_slices_by_the_long_prompts_progress():
    steps = [{"t0": i, "t1": i + 0.5 + i / 10, "decodes": 8, "long_before": 50 * i,
              "long_done": 50 * (i + 1), "long_total": 400} for i in range(8)]
    steps.append({"t0": 9, "t1": 9.1, "decodes": 8, "long_before": 400, "long_done": None,
                  "long_total": 400})  # a decode-only step: not a prefill step
    prof = step_profile(steps, 0.0, 100.0)
    assert [p["steps"] for p in prof] == [2, 2, 2, 2]
    assert [p["context_from"] for p in prof] == [0, 100, 200, 300]
    assert prof[0]["chunk_tokens_mean"] == 50
    assert prof[0]["step_ms_mean"] == pytest.approx(550)
    assert prof[-1]["step_ms_max"] == pytest.approx(1200)
    assert step_profile(steps, 100.0, 200.0) == []


def test_verdict():
    assert _verdict(1.5, True) is True
    assert _verdict(2.5, True) is False
    assert _verdict(2.5, False) is False  # a partial window already over the target
    assert _verdict(1.5, False) is None  # under it so far: not known yet
    assert _verdict(None, True) is None
