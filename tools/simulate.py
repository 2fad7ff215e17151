"""Scheduling simulator: replays one workload under each policy and compares them.

    python -m tools.simulate --policies=fcfs,sjf,sjf:oracle,srpt,mlfq,fair --num_requests=5000 \
        --request_rate=3 --max_num_seqs=64 --max_num_batched_tokens=512 --out_dir=/tmp/sim
    python -m tools.simulate --trace=trace.json --step_costs=h100 ...
    python -m tools.simulate ... --sweep_rates=1,2,3,4     # mean/p99 latency against load

The real scheduler, KV cache manager and length predictors run; the model step is replaced by
jaxserve/sim/step_costs/<--step_costs>.json (see jaxserve/sim). The workload is the serving
benchmark's (jaxserve.sim.workload, same flag names as tools/benchmark_serving.py), or a JSON
trace. A policy "name:predictor" picks its length predictor; "oracle" gives it the true lengths.
Statistics are tools/serving_stats.py's (TTFT, TPOT, E2E = job completion time, goodput under
the SLOs), plus normalized latency (E2E per output token) and preemptions. Writes
simulate.json, simulate.md (a table per policy) and PNG plots to --out_dir.
"""

import dataclasses
import json
import math
import os
import time

import numpy as np
from absl import app, flags

from jaxserve.core.length_predictor import OraclePredictor
from jaxserve.core.scheduling_policy import MLFQPolicy, make_policy
from jaxserve.sim import SimResult, Simulator, StepCostModel, generate_workload, load_trace
from tools import serving_stats
from tools.workload_flags import workload_spec
from jaxserve.cli.flags import FLAGS, engine_config_from_flags

flags.DEFINE_list("policies", ["fcfs", "priority", "sjf", "sjf:oracle", "srpt", "mlfq", "fair"],
                  "Policies to compare; name[:predictor], predictor 'oracle' = true lengths; "
                  "'mlfq-preempt' is mlfq with preemption.")
flags.DEFINE_string("step_costs", "cpu", "Step-time table: a name in jaxserve/sim/step_costs/ or a path.")
flags.DEFINE_string("trace", None, "JSON trace to replay instead of generating a workload.")
flags.DEFINE_integer("num_requests", 2000, "Requests in the run.")
flags.DEFINE_float("request_rate", 2.0, "Poisson arrival rate, requests/s; inf: all at once.")
flags.DEFINE_list("sweep_rates", [], "Also run every policy at these rates and plot against load.")
flags.DEFINE_list("client_shares", ["1"], "Relative request rates of clients c0, c1, ...")
flags.DEFINE_integer("num_priorities", 1, "Priorities drawn uniformly from 0..num_priorities-1.")
flags.DEFINE_float("slo_ttft_ms", 10_000.0, "Goodput SLO on time to first token.")
flags.DEFINE_float("slo_tpot_ms", 500.0, "Goodput SLO on time per output token.")
flags.DEFINE_string("out_dir", None, "Write simulate.json, simulate.md and PNG plots here.")


def workload(rate: float):
    if FLAGS.trace:
        return load_trace(FLAGS.trace)
    return generate_workload(workload_spec(
        FLAGS.num_requests, rate, client_shares=tuple(float(s) for s in FLAGS.client_shares),
        num_priorities=FLAGS.num_priorities))


def serving_records(result: SimResult) -> list[serving_stats.RequestRecord]:
    """The simulator's records in serving_stats' form: first token, then the rest at the end."""
    out = []
    for r in result.records:
        record = serving_stats.RequestRecord(r.prompt_len, r.arrival_time,
                                             error="rejected" if r.rejected else "")
        if not r.rejected:
            record.add_chunk(r.first_token_time, 1)
            if r.output_len > 1:
                record.add_chunk(r.finish_time, r.output_len - 1)
        out.append(record)
    return out


def simulate(policy_name: str, requests, config, cost) -> dict:
    name, _, predictor = policy_name.partition(":")
    if policy_name == "mlfq-preempt":
        policy = MLFQPolicy(preempt=True)
    elif predictor == "oracle":
        policy = make_policy(name, OraclePredictor({r.request_id: r.output_len for r in requests}))
    else:
        policy = make_policy(policy_name)
    start = time.perf_counter()
    result = Simulator(config, policy, cost).run(requests)
    wall_s = time.perf_counter() - start
    slo = serving_stats.SLO(FLAGS.slo_ttft_ms, FLAGS.slo_tpot_ms)
    summary = serving_stats.summarize(serving_records(result), slo)
    del summary["itl_ms"]  # the simulator does not keep every token's time
    done = [r for r in result.records if not r.rejected]
    summary["normalized_latency_ms"] = serving_stats.distribution_ms([r.jct / r.output_len for r in done])
    summary.update(policy=policy_name, preemptions=result.num_preemptions, steps=result.num_steps,
                   simulation_wall_s=wall_s)
    return summary


def table(summaries: list[dict]) -> str:
    ms = lambda x: f"{x / 1e3:,.2f}"  # shown in seconds
    lines = ["| policy | E2E (JCT) mean / p99 s | TTFT mean / p99 s | normalized latency mean / p99 "
             "s/token | goodput req/s | output tok/s | preemptions |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(
            f"| {s['policy']} | {ms(s['e2e_ms']['mean'])} / {ms(s['e2e_ms']['p99'])} "
            f"| {ms(s['ttft_ms']['mean'])} / {ms(s['ttft_ms']['p99'])} "
            f"| {ms(s['normalized_latency_ms']['mean'])} / {ms(s['normalized_latency_ms']['p99'])} "
            f"| {s['goodput']:.3f} | {s['output_throughput']:,.0f} | {s['preemptions']} |")
    return "\n".join(lines)


def plot_policies(summaries: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["policy"] for s in summaries]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, label in ((axes[0], "e2e_ms", "E2E / JCT (s)"), (axes[1], "ttft_ms", "TTFT (s)"),
                           (axes[2], "normalized_latency_ms", "normalized latency (s/token)")):
        ax.bar(x - 0.2, [s[key]["mean"] / 1e3 for s in summaries], 0.4, label="mean")
        ax.bar(x + 0.2, [s[key]["p99"] / 1e3 for s in summaries], 0.4, label="p99")
        ax.set(title=label, xticks=x)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.legend()
    axes[3].bar(x, [s["goodput"] for s in summaries])
    axes[3].set(title="goodput (req/s meeting the SLOs)", xticks=x)
    axes[3].set_xticklabels(names, rotation=30, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(sweep: dict[float, list[dict]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(sweep)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(s["policy"] for s in sweep[rates[0]]):
        at = [next(s for s in sweep[r] if s["policy"] == name) for r in rates]
        axes[0].plot(rates, [s["e2e_ms"]["mean"] / 1e3 for s in at], "o-", label=name)
        axes[1].plot(rates, [s["e2e_ms"]["p99"] / 1e3 for s in at], "o-", label=name)
        axes[2].plot(rates, [s["goodput"] for s in at], "o-", label=name)
    for ax, label in zip(axes, ("mean E2E / JCT (s)", "p99 E2E / JCT (s)", "goodput (req/s)")):
        ax.set(xlabel="arrival rate (req/s)", title=label)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    cost = StepCostModel.load(FLAGS.step_costs)
    config = engine_config_from_flags()
    if config.max_model_len is None:
        config = dataclasses.replace(config, max_model_len=FLAGS.max_prompt_len + FLAGS.max_output_len)
    title = (f"{FLAGS.num_requests if not FLAGS.trace else FLAGS.trace} requests, "
             f"max_num_seqs={config.max_num_seqs}, max_num_batched_tokens="
             f"{config.max_num_batched_tokens}, step costs: {FLAGS.step_costs}")
    requests = workload(FLAGS.request_rate)
    summaries = []
    for name in FLAGS.policies:
        summaries.append(simulate(name, requests, config, cost))
        print(f"{name}: {summaries[-1]['simulation_wall_s']:.1f} s of wall time, "
              f"{summaries[-1]['steps']} steps", flush=True)
    print(table(summaries))
    sweep = {}
    for rate in (float(r) for r in FLAGS.sweep_rates):
        sweep[rate] = [simulate(name, workload(rate), config, cost) for name in FLAGS.policies]
        print(f"rate {rate}: done", flush=True)
    if FLAGS.out_dir:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        with open(os.path.join(FLAGS.out_dir, "simulate.json"), "w") as f:
            json.dump({"title": title, "step_costs": cost.metadata, "summaries": summaries,
                       "sweep": {str(r): s for r, s in sweep.items()}}, f, indent=1,
                      default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
        with open(os.path.join(FLAGS.out_dir, "simulate.md"), "w") as f:
            f.write(f"{title}\n\n{table(summaries)}\n")
        plot_policies(summaries, os.path.join(FLAGS.out_dir, "simulate_policies.png"), title)
        if sweep:
            plot_sweep(sweep, os.path.join(FLAGS.out_dir, "simulate_sweep.png"), title)


if __name__ == "__main__":
    app.run(main)
