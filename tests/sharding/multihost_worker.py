"""One process of the two-process test (test_multihost.py): 4 CPU devices each, joined by
jax.distributed on localhost. Process 0 runs the engine on the golden prompts and prints the
greedy tokens as JSON; process 1 follows.

    python -m tests.sharding.multihost_worker PROCESS_ID PORT FIXTURE PARALLELISM_JSON
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"


def main(process_id: int, port: int, fixture: str, parallelism: dict) -> None:
    from sharding import distributed
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

    import jax
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("JAXSERVE_TEST_JAX_CACHE", "/tmp/jaxserve-test-jax-cache"))
    from jaxserve import SamplingParams
    from tests.conftest import build_engine, fixture_path, run_to_completion

    engine = build_engine(fixture, **parallelism)
    if not distributed.is_leader():
        engine.runner.follow()
        return
    with open(os.path.join(fixture_path(fixture), "golden.json")) as f:
        golden = json.load(f)
    params = SamplingParams(temperature=0.0, max_tokens=len(golden["greedy_tokens"][0]),
                            ignore_eos=True)
    ids = [engine.add_request(p, params) for p in golden["prompts"]]
    outs = run_to_completion(engine)
    engine.runner.release_followers()
    print("TOKENS " + json.dumps([outs[i].outputs[0].token_ids for i in ids]), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
