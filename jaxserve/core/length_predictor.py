"""Output-length predictors: how many tokens a request will generate, guessed before it runs.

The job-size policies (sjf, srpt) order requests by these guesses. Every predictor has the same
two methods: `predict(prompt_token_ids, metadata)` before a request runs, and
`observe(prompt_token_ids, metadata, actual_length)` when it has finished, so the learned ones
follow the workload: they refit on a sliding window of the most recent finished requests and
forget what came before a shift. numpy only, host side, a few tens of microseconds a prediction.

- heuristic: a rule (output grows with the square root of the prompt, capped by max_tokens) whose
  one scale is calibrated on the window.
- regressor: ridge least squares of log length on prompt features.
- classifier: short / medium / long buckets by softmax regression, with a confidence.
- ranker: pairwise logistic regression on feature differences; orders requests, no lengths.
- hybrid: the classifier's bucket when it is confident, else the regressor.
"""

import abc
import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

NUM_TOKEN_BINS = 16
NUM_FEATURES = 4 + NUM_TOKEN_BINS
DEFAULT_MAX_TOKENS = 4096  # stands in for "no max_tokens" in the features and caps


@dataclasses.dataclass(frozen=True)
class RequestMetadata:
    """What is known about a request besides its prompt."""

    request_id: str = ""
    max_tokens: int | None = None
    priority: int = 0
    client_id: str = ""

    @classmethod
    def of(cls, seq) -> "RequestMetadata":
        """The metadata of a `jaxserve.request.Sequence`."""
        return cls(seq.request_id, seq.params.max_tokens, seq.priority, seq.client_id)


@dataclasses.dataclass(frozen=True)
class Prediction:
    score: float  # orders requests: a lower score is expected to finish sooner
    length: float | None  # expected output tokens; None for a predictor that only ranks
    bucket: int | None = None  # classifier: index into its buckets
    confidence: float | None = None  # classifier: probability of that bucket


def prompt_features(prompt_token_ids: Sequence[int], metadata: RequestMetadata) -> np.ndarray:
    """[NUM_FEATURES] float64: bias, log prompt length, log max_tokens, share of distinct tokens,
    and the prompt's token histogram hashed into NUM_TOKEN_BINS bins (a cheap topic signature)."""
    n = len(prompt_token_ids)
    features = np.empty(NUM_FEATURES)
    features[:4] = (1.0, math.log1p(n), math.log1p(metadata.max_tokens or DEFAULT_MAX_TOKENS),
                    len(set(prompt_token_ids)) / max(n, 1))
    tokens = np.asarray(prompt_token_ids, np.int64)
    features[4:] = np.bincount(tokens % NUM_TOKEN_BINS, minlength=NUM_TOKEN_BINS) / max(n, 1)
    return features


def _softmax(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def _cap(length: float, metadata: RequestMetadata) -> float:
    return float(min(max(length, 1.0), metadata.max_tokens or DEFAULT_MAX_TOKENS))


class LengthPredictor(abc.ABC):
    name: str
    gives_lengths = True  # False: only `score` is meaningful (srpt needs lengths)

    @abc.abstractmethod
    def predict(self, prompt_token_ids: Sequence[int], metadata: RequestMetadata) -> Prediction:
        """The expected output length of a request that has not run yet."""

    def observe(self, prompt_token_ids: Sequence[int], metadata: RequestMetadata,
                actual_length: int) -> None:
        """Learns from a finished request (default: nothing to learn)."""


class _Window:
    """Features and log lengths of the last `size` finished requests, in a ring buffer."""

    def __init__(self, size: int):
        self.x = np.zeros((size, NUM_FEATURES))  # [size, NUM_FEATURES]
        self.y = np.zeros(size)  # [size] log1p(actual length)
        self.num_seen = 0
        self.since_fit = 0

    def add(self, x: np.ndarray, length: int) -> None:
        i = self.num_seen % len(self.y)
        self.x[i], self.y[i] = x, np.log1p(length)
        self.num_seen += 1
        self.since_fit += 1

    def due(self, every: int, minimum: int) -> bool:
        """True once every `every` observations after the first `minimum`; restarts the count."""
        if self.since_fit >= every and self.num_seen >= minimum:
            self.since_fit = 0
            return True
        return False

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.num_seen, len(self.y))
        return self.x[:n], self.y[:n]


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of each column; the bias column keeps mean 0 and scale 1."""
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    mean[0], scale[0] = 0.0, 1.0
    return mean, scale


class MeanPredictor(LengthPredictor):
    """The constant baseline: the mean log length of the window, whatever the prompt."""

    name = "mean"

    def __init__(self, window: int = 2048, prior_length: float = 128.0):
        self.window = _Window(window)
        self.prior_length = prior_length

    def predict(self, prompt_token_ids, metadata):
        _, y = self.window.arrays()
        length = float(np.expm1(y.mean())) if y.size else self.prior_length
        return Prediction(length, length)

    def observe(self, prompt_token_ids, metadata, actual_length):
        self.window.add(np.zeros(NUM_FEATURES), actual_length)


class OraclePredictor(LengthPredictor):
    """Knows the answer (simulator only): lengths by request id."""

    name = "oracle"

    def __init__(self, lengths: Mapping[str, int]):
        self.lengths = lengths

    def predict(self, prompt_token_ids, metadata):
        length = float(self.lengths[metadata.request_id])
        return Prediction(length, length)


class HeuristicPredictor(LengthPredictor):
    """Rule: scale * sqrt(prompt length), capped by max_tokens; the scale is the median ratio of
    actual length to sqrt(prompt length) over the window, refit every `refit_every` requests."""

    name = "heuristic"

    def __init__(self, scale: float = 8.0, window: int = 1024, refit_every: int = 16):
        self.scale = scale
        self.log_ratios = np.zeros(window)
        self.num_seen = 0
        self.refit_every = refit_every

    def predict(self, prompt_token_ids, metadata):
        length = _cap(self.scale * np.sqrt(len(prompt_token_ids)), metadata)
        return Prediction(length, length)

    def observe(self, prompt_token_ids, metadata, actual_length):
        ratio = actual_length / np.sqrt(max(len(prompt_token_ids), 1))
        self.log_ratios[self.num_seen % len(self.log_ratios)] = np.log(max(ratio, 1e-3))
        self.num_seen += 1
        if self.num_seen % self.refit_every == 0:
            n = min(self.num_seen, len(self.log_ratios))
            self.scale = float(np.exp(np.median(self.log_ratios[:n])))


class OnlineRegressor(LengthPredictor):
    """Ridge least squares of log(1 + length) on `prompt_features` over the window, refit every
    `refit_every` finished requests; the prior (heuristic) answers until the first fit. The
    normal equations' sums are updated as requests enter and leave the window, so a refit is
    one small solve (and never a large matrix product, which would wake BLAS threads)."""

    name = "regressor"

    def __init__(self, window: int = 2048, refit_every: int = 32, min_observations: int = 64,
                 ridge: float = 1e-2, prior: LengthPredictor | None = None):
        self.window = _Window(window)
        self.refit_every, self.min_observations, self.ridge = refit_every, min_observations, ridge
        self.prior = prior or HeuristicPredictor()
        self.gram = np.zeros((NUM_FEATURES, NUM_FEATURES))  # sum of x x^T over the window
        self.moment = np.zeros(NUM_FEATURES)  # sum of x y
        self.weights: np.ndarray | None = None  # [NUM_FEATURES]

    def predict(self, prompt_token_ids, metadata):
        if self.weights is None:
            return self.prior.predict(prompt_token_ids, metadata)
        x = prompt_features(prompt_token_ids, metadata)
        length = _cap(float(np.expm1(x @ self.weights)), metadata)
        return Prediction(length, length)

    def observe(self, prompt_token_ids, metadata, actual_length):
        self.prior.observe(prompt_token_ids, metadata, actual_length)
        w = self.window
        i = w.num_seen % len(w.y)
        old_x, old_y = w.x[i].copy(), w.y[i]  # zeros until the window is full
        x = prompt_features(prompt_token_ids, metadata)
        w.add(x, actual_length)
        self.gram += np.outer(x, x) - np.outer(old_x, old_x)
        self.moment += x * w.y[i] - old_x * old_y
        if w.due(self.refit_every, self.min_observations):
            n = min(w.num_seen, len(w.y))
            self.weights = np.linalg.solve(self.gram + self.ridge * n * np.eye(NUM_FEATURES), self.moment)


class RangeClassifier(LengthPredictor):
    """Softmax regression of the length bucket (< 64, < 256, longer by default) on standardized
    features. The predicted length is the median of the window's lengths in the chosen bucket;
    the confidence is that bucket's probability (1 / num buckets before the first fit)."""

    name = "classifier"

    def __init__(self, boundaries: tuple[int, ...] = (64, 256), window: int = 2048,
                 refit_every: int = 128, min_observations: int = 64, steps: int = 30,
                 learning_rate: float = 0.5, l2: float = 1e-3):
        self.boundaries = np.asarray(boundaries)
        self.num_buckets = len(boundaries) + 1
        self.window = _Window(window)
        self.refit_every, self.min_observations = refit_every, min_observations
        self.steps, self.learning_rate, self.l2 = steps, learning_rate, l2
        self.weights = np.zeros((NUM_FEATURES, self.num_buckets))  # [features, buckets]
        self.mean, self.scale = np.zeros(NUM_FEATURES), np.ones(NUM_FEATURES)
        edges = np.concatenate([[1], self.boundaries, [4 * self.boundaries[-1]]])
        self.bucket_lengths = np.sqrt(edges[:-1] * edges[1:])  # geometric midpoints until fit

    def bucket_of(self, lengths) -> np.ndarray:
        return np.searchsorted(self.boundaries, lengths, side="right")

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """[..., buckets] for features [..., NUM_FEATURES]."""
        return _softmax(((x - self.mean) / self.scale) @ self.weights)

    def predict(self, prompt_token_ids, metadata):
        p = self.probabilities(prompt_features(prompt_token_ids, metadata))
        bucket = int(p.argmax())
        length = _cap(self.bucket_lengths[bucket], metadata)
        return Prediction(length, length, bucket, float(p[bucket]))

    def observe(self, prompt_token_ids, metadata, actual_length):
        self.window.add(prompt_features(prompt_token_ids, metadata), actual_length)
        if self.window.due(self.refit_every, self.min_observations):
            self._fit(*self.window.arrays())

    def _fit(self, x, log_lengths):
        lengths = np.expm1(log_lengths)
        buckets = self.bucket_of(lengths)
        self.mean, self.scale = _standardize(x)
        z = (x - self.mean) / self.scale
        onehot = np.eye(self.num_buckets)[buckets]  # [n, buckets]
        for _ in range(self.steps):  # full-batch gradient descent, warm-started from the last fit
            grad = z.T @ (_softmax(z @ self.weights) - onehot) / len(z)
            self.weights -= self.learning_rate * (grad + self.l2 * self.weights)
        for b in range(self.num_buckets):
            if np.any(buckets == b):
                self.bucket_lengths[b] = np.median(lengths[buckets == b])


class PairwiseRanker(LengthPredictor):
    """Orders requests without absolute lengths: score = w . standardized features, with w
    fit by logistic regression on feature differences of random pairs from the window
    (label: the first of the pair ran longer). Before the first fit, score = log prompt length."""

    name = "ranker"
    gives_lengths = False

    def __init__(self, window: int = 2048, refit_every: int = 128, min_observations: int = 64,
                 num_pairs: int = 4096, steps: int = 30, learning_rate: float = 0.5,
                 l2: float = 1e-3, seed: int = 0):
        self.window = _Window(window)
        self.refit_every, self.min_observations = refit_every, min_observations
        self.num_pairs, self.steps, self.learning_rate, self.l2 = num_pairs, steps, learning_rate, l2
        self.rng = np.random.default_rng(seed)
        self.weights = np.zeros(NUM_FEATURES)
        self.weights[1] = 1.0
        self.mean, self.scale = np.zeros(NUM_FEATURES), np.ones(NUM_FEATURES)

    def predict(self, prompt_token_ids, metadata):
        x = prompt_features(prompt_token_ids, metadata)
        return Prediction(float(((x - self.mean) / self.scale) @ self.weights), None)

    def observe(self, prompt_token_ids, metadata, actual_length):
        self.window.add(prompt_features(prompt_token_ids, metadata), actual_length)
        if self.window.due(self.refit_every, self.min_observations):
            self._fit(*self.window.arrays())

    def _fit(self, x, y):
        self.mean, self.scale = _standardize(x)
        z = (x - self.mean) / self.scale
        i, j = self.rng.integers(0, len(y), (2, self.num_pairs))
        keep = y[i] != y[j]
        diff, label = z[i[keep]] - z[j[keep]], (y[i[keep]] > y[j[keep]]).astype(float)
        if not len(label):
            return
        for _ in range(self.steps):
            p = 1.0 / (1.0 + np.exp(-(diff @ self.weights)))
            self.weights -= self.learning_rate * (diff.T @ (p - label) / len(label) + self.l2 * self.weights)


class HybridPredictor(LengthPredictor):
    """The classifier's answer when its confidence reaches `min_confidence`, else the fallback's
    (by default a regressor); the bucket and confidence are reported either way."""

    name = "hybrid"

    def __init__(self, classifier: RangeClassifier | None = None,
                 fallback: LengthPredictor | None = None, min_confidence: float = 0.7):
        self.classifier = classifier or RangeClassifier()
        self.fallback = fallback or OnlineRegressor()
        self.min_confidence = min_confidence

    def predict(self, prompt_token_ids, metadata):
        guess = self.classifier.predict(prompt_token_ids, metadata)
        if guess.confidence >= self.min_confidence:
            return guess
        other = self.fallback.predict(prompt_token_ids, metadata)
        return dataclasses.replace(other, bucket=guess.bucket, confidence=guess.confidence)

    def observe(self, prompt_token_ids, metadata, actual_length):
        self.classifier.observe(prompt_token_ids, metadata, actual_length)
        self.fallback.observe(prompt_token_ids, metadata, actual_length)


PREDICTORS: dict[str, type[LengthPredictor]] = {
    cls.name: cls for cls in (MeanPredictor, HeuristicPredictor, OnlineRegressor, RangeClassifier,
                              PairwiseRanker, HybridPredictor)}


def make_predictor(name: str) -> LengthPredictor:
    if name not in PREDICTORS:
        raise ValueError(f"length predictor {name!r} is unknown; known: {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[name]()
