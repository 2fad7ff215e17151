"""The sampling flags of every front (tools.run, tools.chat, tools.client): one per
SamplingParams field, with its name, default and help (jaxserve/cli/dataclass_flags.py), so that
`--seed` or `--temperature` mean the same everywhere. Importing this module defines them.

Only the flags given on the command line override the model's generation defaults
(jaxserve/model_io/generation_defaults.py), as a request's unset fields do in vLLM.
"""

from jaxserve.cli.dataclass_flags import define_flags
from jaxserve.sampling_params import SamplingParams

SAMPLING = define_flags(SamplingParams, "sampling")


def given_sampling_fields() -> dict:
    """SamplingParams field -> value, for the sampling flags given on the command line."""
    return SAMPLING.values(only_given=True)


def sampling_params_from_flags(defaults=None) -> SamplingParams:
    """The sampling flags given; for the others the model's `defaults` (a GenerationDefaults)
    where it has them, else the flags' defaults (SamplingParams', unless a tool changed one).
    ValueError names a bad value."""
    from jaxserve.model_io.generation_defaults import GenerationDefaults  # (reads gguf; only when used)
    return (defaults or GenerationDefaults()).sampling_params(SAMPLING.values(),
                                                              **given_sampling_fields())
