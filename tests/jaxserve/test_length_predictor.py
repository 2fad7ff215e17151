"""Length predictors: each beats a constant baseline on a workload whose output length depends on
the prompt, and follows a distribution shift."""

import copy
import math

import numpy as np
import pytest

from jaxserve.core.length_predictor import (PREDICTORS, HybridPredictor, MeanPredictor,
                                            OraclePredictor, RangeClassifier, RequestMetadata,
                                            make_predictor, prompt_features)
from jaxserve.sim.workload import WorkloadSpec, generate_workload

LEARNED = ["heuristic", "regressor", "classifier", "ranker", "hybrid"]


def _meta(r):
    return RequestMetadata(r.request_id, r.max_tokens)


@pytest.fixture(scope="module")
def workloads():
    before = generate_workload(WorkloadSpec(num_requests=2500, rate=math.inf, seed=1))
    # The shift: task effects reversed and outputs 3x longer; prompts look the same.
    after = generate_workload(WorkloadSpec(num_requests=2000, rate=math.inf, seed=2,
                                           task_effects=(1.5, 0.5, -0.5, -1.5), output_len_median=192))
    return before, after


def _train(predictor, requests):
    for r in requests:
        predictor.observe(r.prompt_token_ids, _meta(r), r.output_len)


def _log_rmse(predictor, requests) -> float:
    guesses = np.log1p([predictor.predict(r.prompt_token_ids, _meta(r)).length for r in requests])
    return float(np.sqrt(np.mean((guesses - np.log1p([r.output_len for r in requests])) ** 2)))


def _rank_corr(predictor, requests) -> float:
    """Spearman correlation of the predictor's score with the actual length."""
    scores = [predictor.predict(r.prompt_token_ids, _meta(r)).score for r in requests]
    ranks = lambda v: np.argsort(np.argsort(v, kind="stable"))
    return float(np.corrcoef(ranks(scores), ranks([r.output_len for r in requests]))[0, 1])


def _error(predictor, requests) -> float:
    """Lower is better: log RMSE, or 1 - rank correlation for a predictor that only ranks."""
    if predictor.gives_lengths:
        return _log_rmse(predictor, requests)
    return 1.0 - _rank_corr(predictor, requests)


@pytest.mark.parametrize("name", LEARNED)
def test_beats_constant_mean_and_adapts_to_shift(name, workloads):
    before, after = workloads
    predictor, baseline = make_predictor(name), MeanPredictor()
    _train(predictor, before[:2000])
    _train(baseline, before[:2000])
    test = before[2000:]
    if predictor.gives_lengths:
        assert _log_rmse(predictor, test) < 0.9 * _log_rmse(baseline, test)
    assert _rank_corr(predictor, test) > 0.4  # the constant's correlation is 0

    frozen = copy.deepcopy(predictor)
    _train(predictor, after[:1500])
    test = after[1500:]
    assert _error(predictor, test) < 0.75 * _error(frozen, test)
    if predictor.gives_lengths:
        _train(baseline, after[:1500])
        assert _log_rmse(predictor, test) < _log_rmse(baseline, test)


def test_classifier_buckets_beat_the_majority_bucket(workloads):
    before, _ = workloads
    classifier = RangeClassifier(boundaries=(64, 256))
    _train(classifier, before[:2000])
    test = before[2000:]
    actual = classifier.bucket_of([r.output_len for r in test])
    guesses = [classifier.predict(r.prompt_token_ids, _meta(r)) for r in test]
    accuracy = np.mean([g.bucket for g in guesses] == actual)
    assert accuracy > np.bincount(actual).max() / len(actual) + 0.1
    confidences = np.array([g.confidence for g in guesses])
    assert np.all((confidences > 1 / 3) & (confidences <= 1.0))
    right = np.array([g.bucket for g in guesses]) == actual
    assert confidences[right].mean() > confidences[~right].mean()  # confidence means something


def test_hybrid_uses_the_classifier_only_when_confident(workloads):
    before, _ = workloads
    hybrid = HybridPredictor(min_confidence=0.7)
    _train(hybrid, before[:1000])
    used = {True: 0, False: 0}
    for r in before[2000:2200]:
        guess = hybrid.predict(r.prompt_token_ids, _meta(r))
        from_classifier = hybrid.classifier.predict(r.prompt_token_ids, _meta(r))
        fallback = hybrid.fallback.predict(r.prompt_token_ids, _meta(r))
        confident = from_classifier.confidence >= 0.7
        assert guess.length == (from_classifier.length if confident else fallback.length)
        assert guess.confidence == from_classifier.confidence
        used[confident] += 1
    assert used[True] and used[False]


def test_untrained_predictors_answer_and_respect_max_tokens():
    meta = RequestMetadata("r", max_tokens=5)
    for name in PREDICTORS:
        guess = make_predictor(name).predict(list(range(400)), meta)
        assert math.isfinite(guess.score)
        if guess.length is not None:
            assert 1 <= guess.length <= 5 or name == "mean"


def test_features_and_registry():
    x = prompt_features([3, 3, 19], RequestMetadata(max_tokens=7))
    assert x[0] == 1.0 and x[1] == pytest.approx(math.log(4)) and x[2] == pytest.approx(math.log(8))
    assert x[3] == pytest.approx(2 / 3)
    assert x[4 + 3] == pytest.approx(3 / 3)  # 3 % 16 == 19 % 16 == 3: one bin holds all three
    assert OraclePredictor({"a": 12}).predict([1], RequestMetadata("a")).length == 12
    with pytest.raises(ValueError, match="unknown.*known: classifier"):
        make_predictor("psychic")
