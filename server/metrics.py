"""Prometheus metrics: request latency histograms, and engine gauges and counters.

Histograms are observed once per finished request from its RequestMetrics (engine clock:
arrival -> first token, and so on). Gauges and counters are read at scrape time from the engine
loop's latest EngineStats snapshot, so the engine thread does no metrics work. Each server has
its own registry (no process-global state): tests run several servers in one process.

Tokens per second: rate(jaxserve_generation_tokens_total[1m]).
"""

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxserve.engine.engine import EngineStats
from jaxserve.outputs import RequestOutput
from server.metrics_http import MetricsHttpServer

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)


class _EngineStatsCollector:
    def __init__(self, stats: Callable[[], EngineStats | None], in_flight: Callable[[], int]):
        self._stats, self._in_flight = stats, in_flight

    def collect(self):
        yield GaugeMetricFamily("jaxserve_requests_in_flight",
                                "Requests admitted by the server and not yet finished",
                                value=self._in_flight())
        stats = self._stats()
        if stats is None:  # still loading
            return
        for name, doc, value in (
                ("jaxserve_num_requests_waiting", "Sequences waiting to be scheduled (queue length)",
                 stats.num_waiting),
                ("jaxserve_num_requests_running", "Sequences running", stats.num_running),
                ("jaxserve_kv_cache_usage_ratio", "Share of KV cache blocks in use",
                 stats.kv_cache_usage),
                ("jaxserve_num_free_kv_blocks", "KV cache blocks free or reusable",
                 stats.num_free_blocks),
                ("jaxserve_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                 stats.prefix_cache_hit_rate),
                ("jaxserve_num_free_swap_slots",
                 "Host memory slots free for swapped-out KV blocks (--preemption_mode=swap)",
                 stats.num_free_swap_slots),
                ("jaxserve_num_swap_slots", "Host memory slots for swapped-out KV blocks",
                 stats.num_swap_slots)):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
                ("jaxserve_preemptions", "Sequences preempted", stats.num_preemptions),
                ("jaxserve_swap_outs", "Preempted sequences swapped to host memory (the others "
                 "recompute)", stats.num_swap_outs),
                ("jaxserve_generation_tokens", "Tokens sampled", stats.num_generated_tokens),
                ("jaxserve_prompt_tokens_computed", "Prompt tokens run through the model",
                 stats.num_prompt_tokens_computed),
                ("jaxserve_spec_decode_draft_tokens", "Proposed tokens verified (speculative "
                 "decoding)", stats.num_draft_tokens),
                ("jaxserve_spec_decode_accepted_tokens", "Proposed tokens accepted",
                 stats.num_accepted_tokens)):
            yield CounterMetricFamily(name, doc, value=value)
        if stats.num_spec_steps:
            yield GaugeMetricFamily("jaxserve_spec_decode_acceptance_rate",
                                    "Accepted / proposed tokens, since start",
                                    value=stats.num_accepted_tokens / stats.num_draft_tokens)
            yield GaugeMetricFamily(
                "jaxserve_spec_decode_mean_accepted_length", "Tokens a speculating sequence "
                "gains per verification step (accepted + 1), since start",
                value=1 + stats.num_accepted_tokens / stats.num_spec_steps)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds",
                              "Arrival to first sampled token", buckets=_TTFT_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram("jaxserve_time_per_output_token_seconds",
                              "Mean gap between output tokens after the first, per request",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "Arrival to finish",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("jaxserve_request_queue_time_seconds",
                                    "Arrival to first scheduled", buckets=_TTFT_BUCKETS,
                                    registry=self.registry)
        self.requests = Counter("jaxserve_requests", "Generate/Complete calls by status code",
                                ["code"], registry=self.registry)
        self.unauthenticated = Counter(
            "jaxserve_unauthenticated_calls", "Calls refused for a missing or wrong bearer token",
            ["endpoint"], registry=self.registry)  # endpoint: grpc or metrics
        self.engine_stalled = Gauge(
            "jaxserve_engine_stalled", "1 while the watchdog sees no engine progress with work "
            "queued (health NOT_SERVING), else 0", registry=self.registry)
        self.engine_stalls = Counter("jaxserve_engine_stalls", "Times the watchdog found the "
                                     "engine loop stalled", registry=self.registry)
        self.replies_refused = Counter(
            "jaxserve_replies_refused", "Unary replies refused for exceeding max_message_bytes "
            "(when: before generating, from the bound, or after)", ["when"],
            registry=self.registry)
        self.registry.register(_EngineStatsCollector(stats, in_flight))
        self._http: MetricsHttpServer | None = None

    def observe_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        for histogram, value in ((self.ttft, m.time_to_first_token), (self.tpot, m.time_per_output_token),
                                 (self.e2e, m.e2e_latency), (self.queue_time, m.queue_time)):
            if value is not None:
                histogram.observe(value)

    def serve(self, host: str, port: int, health: Callable[[], str],
              auth_token: str | None = None) -> int:
        """Starts the HTTP endpoint, /metrics and /health (server/metrics_http.py), on host:port
        (0: a free one); returns the port."""
        self._http = MetricsHttpServer(self.registry, health, self.unauthenticated, auth_token)
        return self._http.start(host, port)

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
