"""Length predictors: accuracy on the synthetic workload, and cost per request in microseconds.

    python -m tools.benchmark_predictors [--train=4000 --test=1000 --shift_train=2000]

Each predictor learns online from --train finished requests of jaxserve.sim.workload's default
workload, is scored on --test more, then learns from --shift_train requests of a shifted workload
(task effects reversed, outputs 3x longer) and is scored on that. Scores: RMSE of log(1 + length)
(the constant-mean baseline's is the workload's spread) and Spearman rank correlation with the
true length (what SJF's ordering needs). Cost: mean wall time of predict() and of observe()
(refits included) per request, single process. Prints a markdown table.
"""

import dataclasses
import math
import time

import numpy as np
from absl import app, flags

from jaxserve.core.length_predictor import PREDICTORS, RequestMetadata, make_predictor
from jaxserve.sim.workload import WorkloadSpec, generate_workload

flags.DEFINE_integer("train", 4000, "Finished requests to learn from before scoring.")
flags.DEFINE_integer("test", 1000, "Requests scored.")
flags.DEFINE_integer("shift_train", 2000, "Requests of the shifted workload learned before scoring it.")
FLAGS = flags.FLAGS


def _scores(predictor, requests) -> tuple[float | None, float, float]:
    """(log RMSE or None, Spearman, microseconds per predict)."""
    start = time.perf_counter()
    guesses = [predictor.predict(r.prompt_token_ids, RequestMetadata(r.request_id, r.max_tokens))
               for r in requests]
    micros = (time.perf_counter() - start) / len(requests) * 1e6
    actual = np.array([r.output_len for r in requests])
    ranks = lambda v: np.argsort(np.argsort(v, kind="stable"))
    spearman = float(np.corrcoef(ranks([g.score for g in guesses]), ranks(actual))[0, 1])
    rmse = None
    if guesses[0].length is not None:
        rmse = float(np.sqrt(np.mean((np.log1p([g.length for g in guesses]) - np.log1p(actual)) ** 2)))
    return rmse, spearman, micros


def _observe(predictor, requests) -> float:
    start = time.perf_counter()
    for r in requests:
        predictor.observe(r.prompt_token_ids, RequestMetadata(r.request_id, r.max_tokens), r.output_len)
    return (time.perf_counter() - start) / len(requests) * 1e6


def main(argv):
    del argv
    def as_lists(requests):  # token lists, as the scheduler hands them over
        return [dataclasses.replace(r, prompt_token_ids=r.prompt_token_ids.tolist()) for r in requests]
    before = as_lists(generate_workload(WorkloadSpec(num_requests=FLAGS.train + FLAGS.test,
                                                     rate=math.inf, seed=1)))
    after = as_lists(generate_workload(WorkloadSpec(
        num_requests=FLAGS.shift_train + FLAGS.test, rate=math.inf, seed=2,
        task_effects=(1.5, 0.5, -0.5, -1.5), output_len_median=192)))
    lines = ["| predictor | log RMSE | Spearman | after shift: log RMSE | Spearman "
             "| predict µs | observe µs |", "|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    for name in PREDICTORS:
        predictor = make_predictor(name)
        observe_us = _observe(predictor, before[:FLAGS.train])
        rmse, rank, predict_us = _scores(predictor, before[FLAGS.train:])
        observe_us = (observe_us + _observe(predictor, after[:FLAGS.shift_train])) / 2
        rmse2, rank2, _ = _scores(predictor, after[FLAGS.shift_train:])
        lines.append(f"| {name} | {fmt(rmse)} | {fmt(rank)} | {fmt(rmse2)} | {fmt(rank2)} "
                     f"| {predict_us:.0f} | {observe_us:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
