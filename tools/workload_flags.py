"""The workload flags of the serving benchmark and the simulator, defined once so that the same
flags draw the same requests in both (jaxserve.sim.workload; documented parameters, seeded)."""

from absl import flags

from jaxserve.sim.workload import WorkloadSpec

flags.DEFINE_float("prompt_len_median", 128.0, "Median prompt length, tokens.")
flags.DEFINE_float("prompt_len_sigma", 1.0, "Sigma of log prompt length.")
flags.DEFINE_integer("max_prompt_len", 1024, "Longest prompt.")
flags.DEFINE_float("output_len_median", 64.0, "Median output length, tokens.")
flags.DEFINE_float("output_len_sigma", 1.0, "Sigma of log output length.")
flags.DEFINE_integer("max_output_len", 1024, "Longest output.")
flags.DEFINE_float("predictability", 0.7, "Share of log output-length variance the prompt explains.")
flags.DEFINE_integer("workload_seed", 0, "Seeds arrivals, lengths and prompt tokens.")
FLAGS = flags.FLAGS


def workload_spec(num_requests: int, rate: float, **fields) -> WorkloadSpec:
    """The WorkloadSpec these flags describe; `fields` sets the rest (vocab_size, clients...)."""
    return WorkloadSpec(
        num_requests=num_requests, rate=rate, prompt_len_median=FLAGS.prompt_len_median,
        prompt_len_sigma=FLAGS.prompt_len_sigma, max_prompt_len=FLAGS.max_prompt_len,
        output_len_median=FLAGS.output_len_median, output_len_sigma=FLAGS.output_len_sigma,
        max_output_len=FLAGS.max_output_len, predictability=FLAGS.predictability,
        seed=FLAGS.workload_seed, **fields)
