"""The compiled step updates the KV cache in place: no temporary the size of a layer's cache."""

import pytest

from tests.conftest import build_engine


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_step_temporaries_are_far_below_one_layer_of_cache(backend):
    engine = build_engine(attention_backend=backend, num_kv_blocks=8192)
    runner = engine.runner
    layer_bytes = sum(pages.nbytes for pages in runner.kv_caches[0])  # 16 MiB here
    keys = [("forward", 64, 8)] + [("decode", s, s) for s in runner.decode_buckets[:1]]
    for key in keys:
        memory = runner._lower(key).compile().memory_analysis()
        # The cache is donated and aliased to the output, so it is not a temporary either.
        assert memory.alias_size_in_bytes >= layer_bytes * engine.model_config.num_layers
        assert memory.temp_size_in_bytes < layer_bytes / 8, key
