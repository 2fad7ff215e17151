"""Latency statistics of a serving benchmark: per-request records in, a summary, a table, a plot.

Definitions (those of vLLM's benchmark_serving, so figures compare):
  TTFT  time to first token: request sent -> first chunk with a token.
  TPOT  time per output token, per request: (last token - first token) / (output tokens - 1).
  ITL   inter-token latency: the gap between consecutive chunks that carry tokens (a chunk may
        carry several tokens when the client falls behind; it counts once).
  E2E   request sent -> last token.
  Goodput: requests per second that finished and met every SLO (TTFT <= slo_ttft_ms and
        TPOT <= slo_tpot_ms; a one-token request meets the TPOT SLO), as in DistServe.
Percentiles are numpy's linear interpolation.
"""

import dataclasses
import math

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds on one monotonic clock."""

    prompt_tokens: int
    sent: float
    chunk_times: list[float] = dataclasses.field(default_factory=list)  # chunks with tokens
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)  # tokens in each
    error: str = ""  # the status code name when the request failed

    def add_chunk(self, time_s: float, num_tokens: int) -> None:
        if num_tokens:
            self.chunk_times.append(time_s)
            self.chunk_tokens.append(num_tokens)

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times)) if self.ok else []

    @property
    def e2e(self) -> float | None:
        return self.chunk_times[-1] - self.sent if self.ok else None


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float

    def met_by(self, record: RequestRecord) -> bool:
        return (record.ok and record.ttft * 1e3 <= self.ttft_ms
                and (record.tpot is None or record.tpot * 1e3 <= self.tpot_ms))


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean and percentiles, in milliseconds; None for an empty list."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    values = np.asarray(values_s, np.float64) * 1e3
    return {"mean": float(values.mean()),
            **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


def summarize(records: list[RequestRecord], slo: SLO, duration_s: float | None = None) -> dict:
    """Throughput, latency distributions and goodput of a run.

    duration_s defaults to first send -> last token over all requests.
    """
    done = [r for r in records if r.ok]
    if duration_s is None:
        ends = [r.chunk_times[-1] for r in done]
        duration_s = (max(ends) - min(r.sent for r in records)) if ends else 0.0
    rate = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput": rate(len(done)),
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(output_tokens + prompt_tokens),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "ttft_ms": distribution_ms([r.ttft for r in done]),
        "tpot_ms": distribution_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": distribution_ms([x for r in done for x in r.itls]),
        "e2e_ms": distribution_ms([r.e2e for r in done]),
        "slo": dataclasses.asdict(slo),
        "good_requests": sum(slo.met_by(r) for r in done),
        "goodput": rate(sum(slo.met_by(r) for r in done)),
    }


def format_table(summary: dict) -> str:
    def number(x, unit=""):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.2f}{unit}"

    lines = [
        f"{'requests completed / failed':<32}{summary['completed']} / {summary['failed']}",
        f"{'duration':<32}{number(summary['duration_s'], ' s')}",
        f"{'request throughput':<32}{number(summary['request_throughput'], ' req/s')}",
        f"{'output token throughput':<32}{number(summary['output_throughput'], ' tok/s')}",
        f"{'total token throughput':<32}{number(summary['total_token_throughput'], ' tok/s')}",
        f"{'goodput':<32}{number(summary['goodput'], ' req/s')}  ({summary['good_requests']} "
        f"requests met TTFT <= {summary['slo']['ttft_ms']:g} ms, TPOT <= "
        f"{summary['slo']['tpot_ms']:g} ms)",
        "",
        f"{'ms':<8}" + "".join(f"{k:>12}" for k in ("mean", *(f"p{p}" for p in PERCENTILES))),
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        stats = summary[f"{name}_ms"]
        lines.append(f"{name.upper():<8}" + "".join(f"{number(v):>12}" for v in stats.values()))
    return "\n".join(lines)


def plot(records: list[RequestRecord], summary: dict, path: str, title: str) -> None:
    """TTFT and TPOT CDFs with their SLOs, the ITL histogram and output tokens/s over time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name, values, slo in (
            (axes[0, 0], "TTFT", [r.ttft for r in done], summary["slo"]["ttft_ms"]),
            (axes[0, 1], "TPOT", [r.tpot for r in done if r.tpot is not None],
             summary["slo"]["tpot_ms"])):
        values = np.sort(np.asarray(values, np.float64) * 1e3)
        ax.plot(values, np.arange(1, len(values) + 1) / max(1, len(values)))
        ax.axvline(slo, color="red", linestyle="--", label=f"SLO {slo:g} ms")
        ax.set(xlabel=f"{name} (ms)", ylabel="share of requests", title=f"{name} CDF")
        ax.legend()
    itls = np.asarray([x for r in done for x in r.itls], np.float64) * 1e3
    axes[1, 0].hist(itls, bins=50, range=(0.0, float(itls.max()) if len(itls) else 1.0))
    axes[1, 0].set(xlabel="inter-token latency (ms)", ylabel="chunks", title="ITL")
    if done:
        start = min(r.sent for r in records)
        times = np.concatenate([np.asarray(r.chunk_times) - start for r in done])
        tokens = np.concatenate([r.chunk_tokens for r in done])
        axes[1, 1].hist(times, bins=np.arange(0.0, float(times.max()) + 1.0, 1.0), weights=tokens)
    axes[1, 1].set(xlabel="time since start (s)", ylabel="output tokens / s", title="throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
