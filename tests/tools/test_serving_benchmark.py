"""The serving benchmark's workload (jaxserve.sim.workload, as benchmark_serving draws it) and its
statistics (tools/serving_stats.py)."""

import math

import numpy as np
import pytest

from jaxserve.sim.workload import WorkloadSpec, generate_workload
from tools.serving_stats import SLO, RequestRecord, distribution_ms, format_table, plot, summarize


def test_workload_is_seeded_and_heavy_tailed():
    spec = WorkloadSpec(num_requests=2000, rate=10.0, vocab_size=259, seed=3)
    requests = generate_workload(spec)
    again = generate_workload(spec)
    assert [(r.arrival_time, list(r.prompt_token_ids), r.output_len) for r in requests] == \
        [(r.arrival_time, list(r.prompt_token_ids), r.output_len) for r in again]
    other = generate_workload(WorkloadSpec(num_requests=2000, rate=10.0, vocab_size=259, seed=4))
    assert [r.output_len for r in other] != [r.output_len for r in requests]
    for lengths in ([len(r.prompt_token_ids) for r in requests], [r.output_len for r in requests]):
        assert np.percentile(lengths, 99) / np.median(lengths) > 5  # chat-like long tail
    gaps = np.diff([r.arrival_time for r in requests])
    assert np.all(gaps >= 0) and np.mean(gaps) == pytest.approx(0.1, rel=0.1)  # Poisson, rate 10
    burst = generate_workload(WorkloadSpec(num_requests=5, rate=math.inf))
    assert [r.arrival_time for r in burst] == [0.0] * 5


def _records():
    r1 = RequestRecord(prompt_tokens=10, sent=0.0)
    for t in (0.1, 0.2, 0.3):
        r1.add_chunk(t, 1)  # TTFT 100 ms, TPOT 100 ms
    r2 = RequestRecord(prompt_tokens=20, sent=0.0)
    r2.add_chunk(0.5, 1)
    r2.add_chunk(0.6, 2)  # TTFT 500 ms, 3 tokens: TPOT (600 - 500) / 2 = 50 ms
    r3 = RequestRecord(prompt_tokens=30, sent=0.2, error="UNAVAILABLE")
    r4 = RequestRecord(prompt_tokens=40, sent=1.0)
    r4.add_chunk(1.05, 1)  # TTFT 50 ms, one token: no TPOT
    return [r1, r2, r3, r4]


def test_summary_percentiles_and_goodput():
    summary = summarize(_records(), SLO(ttft_ms=200, tpot_ms=80))
    assert (summary["completed"], summary["failed"]) == (3, 1)
    assert summary["duration_s"] == pytest.approx(1.05)
    assert summary["output_tokens"] == 7 and summary["prompt_tokens"] == 70
    assert summary["output_throughput"] == pytest.approx(7 / 1.05)
    ttft = summary["ttft_ms"]  # of 50, 100, 500
    assert ttft["mean"] == pytest.approx(650 / 3)
    assert ttft["p50"] == pytest.approx(100)
    assert ttft["p90"] == pytest.approx(100 + 0.8 * 400)
    assert ttft["p99"] == pytest.approx(100 + 0.98 * 400)
    assert summary["tpot_ms"]["mean"] == pytest.approx(75)
    assert summary["itl_ms"]["mean"] == pytest.approx(100)  # 100, 100 (r1) and 100 (r2)
    assert summary["e2e_ms"]["p50"] == pytest.approx(300)
    # r1 misses TPOT, r2 misses TTFT, r3 failed: only r4 is good.
    assert summary["good_requests"] == 1
    assert summary["goodput"] == pytest.approx(1 / 1.05)
    assert "goodput" in format_table(summary)


def test_distribution_of_nothing_and_of_a_ramp():
    assert distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    ramp = distribution_ms([i / 1000 for i in range(101)])  # 0..100 ms
    assert ramp == pytest.approx({"mean": 50.0, "p50": 50.0, "p90": 90.0, "p99": 99.0})


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = _records()
    path = tmp_path / "plot.png"
    plot(records, summarize(records, SLO(200, 80)), str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
