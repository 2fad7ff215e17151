"""Configuration: the model's shape (read from a Hugging Face config.json) and the engine's limits.

Both are frozen dataclasses; flags and keyword arguments become one of these once, at start-up,
and every constructor below takes them as they are.
"""

import dataclasses
import json
import math
import os

import jax

from sharding.mesh import MeshShape, validate as validate_mesh

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")


def read_json_object(path: str) -> dict:
    """The JSON object in `path`; ValueError naming the file when it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"model: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"model: {path} must hold a JSON object, got {type(data).__name__}")
    return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The architecture of one Llama-family model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # (("rope_type", "llama3"), ("factor", 8.0), ...) or None: a hashable form of rope_scaling;
    # (("rope_type", "freq_factors"), ("freq_factors", (1.0, ...))) from a GGUF's rope_freqs.
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    num_experts: int = 0  # > 0 for a mixture-of-experts model
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "ModelConfig":
        """Reads the fields of a Hugging Face config.json; raises ValueError naming what is wrong."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported; only 'silu'")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if not isinstance(hf.get(key), int) or hf[key] <= 0:
                raise ValueError(f"config.json: {key} must be a positive integer, got {hf.get(key)!r}")
        num_q_heads = hf["num_attention_heads"]
        num_kv_heads = hf.get("num_key_value_heads") or num_q_heads
        if num_q_heads % num_kv_heads:
            raise ValueError(f"config.json: num_attention_heads ({num_q_heads}) must be a multiple "
                             f"of num_key_value_heads ({num_kv_heads})")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_q_heads
        # transformers >= 5 writes rope_parameters (with rope_theta inside); older writes
        # rope_scaling beside rope_theta.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported; "
                             "supported: default, llama3, linear")
        rope_scaling = None
        if rope_type != "default":
            rope_scaling = (("rope_type", rope_type),) + tuple(
                sorted((k, v) for k, v in rope.items() if isinstance(v, (int, float))))
        sliding_window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding_window = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            sliding_window=sliding_window,
            num_experts=int(hf.get("num_local_experts", 0) or 0),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 0) or 0),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        """From config.json of a model folder (EOS ids also from its generation_config.json and
        tokenizer_config.json), or from the metadata of a GGUF file (a .gguf path, or a folder
        holding one .gguf and no config.json)."""
        # Both import this module: imported late.
        from jaxserve.model_io import gguf_checkpoint
        from jaxserve.model_io.generation_defaults import eos_token_ids
        if gguf_checkpoint.is_gguf(model_dir):
            return gguf_checkpoint.model_config_from_gguf(gguf_checkpoint.open_gguf(model_dir))
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model: no config.json in {model_dir!r}")
        hf = read_json_object(path)
        # Every EOS the model's files name stops generation: config.json's, generation_config's
        # and the tokenizer's (jaxserve/model_io/generation_defaults.py).
        return cls.from_hf_dict(dict(hf, eos_token_id=list(eos_token_ids(model_dir, hf))))

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Limits of the continuous-batching engine.

    Attributes:
      max_model_len: longest sequence (prompt + output); defaults to the model's context.
      max_num_seqs: sequences in one step.
      max_num_batched_tokens: tokens in one step (decode tokens plus prefill chunks).
      block_size: tokens per KV cache block.
      num_kv_blocks: KV cache blocks; None sizes the cache from kv_cache_memory_fraction.
      kv_cache_memory_fraction: share of the accelerator memory left after the weights.
      enable_prefix_caching: reuse cached full blocks of earlier prompts.
      enable_chunked_prefill: split long prompts over steps; off means a prompt is prefilled whole.
      dtype: weights and activations ("bfloat16" or "float32").
      attention_backend: "auto" (Pallas on GPU/TPU, reference on CPU), "pallas" or "reference".
      max_logprobs: most top-N logprobs a request may ask for.
      max_stop_token_ids: most stop token ids (plus EOS) a request may give; fixed on device.
      scheduling_policy: name of the waiting-queue policy ("fcfs").
      preemption_mode: what a preempted sequence keeps: "recompute" (nothing: its prompt and
        outputs run again when readmitted) or "swap" (its KV blocks are copied to host memory and
        back; recompute when the swap space is full).
      swap_space_gib: host memory, GiB, for swapped-out KV blocks (preemption_mode "swap") and
        for KV blocks received from a prefill engine (disaggregation_role "decode").
      disaggregation_role: "none" (prefill and decode in one engine), or this engine's half of a
        prefill/decode pair (jaxserve/engine/disaggregation.py): "prefill" hands each request's KV
        blocks over after its first token, "decode" receives them into its swap space.
      seed: seeds the per-request sampling seeds of requests that give none.
      tensor_parallel, sequence_parallel, expert_parallel, data_parallel: devices along each
        axis of the mesh (docs/SHARDING.md); their product is the number of devices used.
      sequence_parallel_threshold: a prompt of at least this many tokens, scheduled whole in one
        step, is prefilled with ring attention over the sequence axis (sequence_parallel > 1).
      async_scheduling: overlap the host's work with the device's: schedule and dispatch step
        N+1 before reading step N's tokens (jaxserve/engine/engine.py). Off: each step is read back
        before the next is scheduled.
      compilation_cache: keep compiled steps in JAX's persistent compilation cache, in the
        jaxserve cache folder (jaxserve/model_io/default_model.py), so a restart compiles nothing anew;
        a cache folder set in jax.config beforehand is used instead.
      speculative_method: "none", "ngram" (prompt lookup: the latest earlier occurrence of the
        sequence's last n tokens proposes the tokens that followed it) or "draft" (a smaller
        model, speculative_model, drafts greedily). Proposals are verified in one step
        (docs/SPECULATIVE.md).
      num_speculative_tokens: tokens proposed per step and sequence (k); each speculating
        sequence then runs k + 1 query tokens.
      speculative_model: checkpoint of the draft model (same tokenizer), for method "draft".
      ngram_min, ngram_max: the n-gram lengths prompt lookup tries, longest first.
      speculative_min_acceptance: a sequence stops speculating once the share of its proposed
        tokens accepted falls below this (judged over its last 16 proposed tokens), or after 8
        steps in a row without a proposal; 0 keeps it speculating.
    """

    max_model_len: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.8
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str = "bfloat16"
    attention_backend: str = "auto"
    max_logprobs: int = 20
    max_stop_token_ids: int = 16
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    swap_space_gib: float = 4.0
    disaggregation_role: str = "none"
    seed: int = 0
    tensor_parallel: int = 1
    sequence_parallel: int = 1
    expert_parallel: int = 1
    data_parallel: int = 1
    sequence_parallel_threshold: int = 1024
    async_scheduling: bool = True
    compilation_cache: bool = True
    speculative_method: str = "none"
    num_speculative_tokens: int = 4
    speculative_model: str | None = None
    ngram_min: int = 2
    ngram_max: int = 4
    speculative_min_acceptance: float = 0.25

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_logprobs",
                     "max_stop_token_ids", "tensor_parallel", "sequence_parallel",
                     "expert_parallel", "data_parallel", "sequence_parallel_threshold"):
            positive(name)
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(f"EngineConfig.max_num_seqs ({self.max_num_seqs}) must be <= "
                             f"max_num_batched_tokens ({self.max_num_batched_tokens})")
        if self.max_model_len is not None:
            positive("max_model_len")
        if self.num_kv_blocks is not None:
            positive("num_kv_blocks")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError("EngineConfig.kv_cache_memory_fraction must be in (0, 1], got "
                             f"{self.kv_cache_memory_fraction}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"EngineConfig.dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.attention_backend not in ("auto", "pallas", "reference"):
            raise ValueError("EngineConfig.attention_backend must be 'auto', 'pallas' or "
                             f"'reference', got {self.attention_backend!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError("EngineConfig.preemption_mode must be 'recompute' or 'swap', got "
                             f"{self.preemption_mode!r}")
        if self.disaggregation_role not in ("none", "prefill", "decode"):
            raise ValueError("EngineConfig.disaggregation_role must be 'none', 'prefill' or "
                             f"'decode', got {self.disaggregation_role!r}")
        if (isinstance(self.swap_space_gib, bool) or not isinstance(self.swap_space_gib, (int, float))
                or not 0 <= self.swap_space_gib < math.inf):
            raise ValueError(f"EngineConfig.swap_space_gib must be >= 0, got {self.swap_space_gib!r} (a finite number of GiB)")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size must be a power of two, got {self.block_size}")
        self._validate_speculation()

    def _validate_speculation(self) -> None:
        if self.speculative_method not in ("none", "ngram", "draft"):
            raise ValueError("EngineConfig.speculative_method must be 'none', 'ngram' or 'draft', "
                             f"got {self.speculative_method!r}")
        for name in ("num_speculative_tokens", "ngram_min", "ngram_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"EngineConfig.ngram_min ({self.ngram_min}) must be <= ngram_max "
                             f"({self.ngram_max})")
        rate = self.speculative_min_acceptance
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"EngineConfig.speculative_min_acceptance must be in [0, 1], got {rate!r}")
        if self.speculative_method == "none":
            return
        if self.speculative_method == "draft" and not self.speculative_model:
            raise ValueError("EngineConfig.speculative_method 'draft' needs speculative_model "
                             "(the draft model's checkpoint, with the target's tokenizer)")
        if self.speculative_model is not None and self.speculative_method != "draft":
            raise ValueError("EngineConfig.speculative_model is only for speculative_method 'draft'")
        if self.num_speculative_tokens + 1 > self.max_num_batched_tokens:
            raise ValueError(f"EngineConfig.num_speculative_tokens ({self.num_speculative_tokens}) "
                             f"+ 1 must be <= max_num_batched_tokens ({self.max_num_batched_tokens})")
        unsupported = [(self.disaggregation_role != "none", "disaggregation_role "
                        f"{self.disaggregation_role!r}"),
                       (self.sequence_parallel > 1, f"sequence_parallel {self.sequence_parallel}")]
        for bad, what in unsupported:
            if bad:
                raise ValueError(f"EngineConfig.speculative_method {self.speculative_method!r} "
                                 f"does not run with {what}; use speculative_method 'none'")

    def resolve(self, model: ModelConfig) -> "EngineConfig":
        """Fills max_model_len from the model and checks the limits against each other."""
        max_model_len = self.max_model_len or model.max_position_embeddings
        if max_model_len > model.max_position_embeddings:
            raise ValueError(f"EngineConfig.max_model_len ({max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({model.max_position_embeddings})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({max_model_len}) when chunked prefill is off, or a long prompt "
                "could never be scheduled")
        if self.num_kv_blocks is not None and self.num_kv_blocks * self.block_size < max_model_len:
            raise ValueError(
                f"EngineConfig.num_kv_blocks ({self.num_kv_blocks}) x block_size "
                f"({self.block_size}) = {self.num_kv_blocks * self.block_size} tokens is less than "
                f"max_model_len ({max_model_len}): one full-length sequence would not fit")
        if self.speculative_method == "draft" and jax.process_count() > 1:
            raise ValueError("EngineConfig.speculative_method 'draft' runs in one process only; "
                             "use 'ngram' for multi-host runs")
        validate_mesh(MeshShape.of(self), num_devices=jax.device_count(),
                      num_q_heads=model.num_q_heads, num_kv_heads=model.num_kv_heads,
                      vocab_size=model.vocab_size, hidden_size=model.hidden_size,
                      intermediate_size=model.intermediate_size,
                      num_experts=model.num_experts)
        return dataclasses.replace(self, max_model_len=max_model_len)

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)
