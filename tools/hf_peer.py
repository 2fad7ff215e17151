"""Hugging Face transformers `generate` as the peer that tools/benchmark_throughput.py sets beside jaxserve.

Same model shape (a tools/model_shapes/ folder holding only a config.json), dtype, prompt and output
lengths as the engine run, with random weights: greedy decoding, no EOS stop, every request exactly
output_len new tokens. Two modes:

  eager   `model.generate` with the default dynamic KV cache, no compilation.
  static  `cache_implementation="static"` with the decode forward under torch.compile
          ("reduce-overhead", i.e. CUDA graphs on a GPU), the way transformers documents fast generation.

    python -m tools.hf_peer --config_dir=tools/model_shapes/llama3-8b --batch=64 --input_len=128 \
        --output_len=128 --modes=eager,static

torch and transformers are imported lazily and are no dependency of jaxserve: `available()` says
whether this peer can run. Nothing here raises on a runtime failure (OOM, a compile error): the
result carries the message in "error" and the benchmark goes on.

GPU memory: the peer shares its process with the JAX engine, and JAX preallocates most of the GPU
when its backend starts. Run the peer first and call `release()` before the engine is built, or
start the process with XLA_PYTHON_CLIENT_MEM_FRACTION (or XLA_PYTHON_CLIENT_PREALLOCATE=false) so
that both fit. `release()` returns torch's cached blocks to the driver; torch's CUDA context stays.
"""

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

MODES = ("eager", "static")


@dataclasses.dataclass
class _BuiltModel:
    key: tuple  # (config_dir, dtype, device)
    model: object  # a transformers PreTrainedModel
    build_s: float
    # Older transformers (no CompileConfig) compile by swapping model.forward; kept so that each
    # static call reuses the graphs compiled by the first one.
    compiled_forward: object = None


# One model at a time: the benchmark calls once per (batch size, mode), the eager and static runs
# share the weights, and two 8B models would not leave room for the engine afterwards.
_built: _BuiltModel | None = None


def available(allow_cpu: bool = False) -> bool:
    """True when torch and transformers import and a CUDA device is visible (or allow_cpu)."""
    try:
        import torch
        import transformers  # noqa: F401 (imports, or the peer cannot run)
    except Exception:  # noqa: BLE001 - a broken install is as unavailable as a missing one
        return False
    return allow_cpu or torch.cuda.is_available()


def release() -> None:
    """Drops the cached model and compiled graphs and hands torch's cached GPU memory back."""
    global _built
    _built = None
    if "torch" not in sys.modules:
        return
    import torch
    # CUDA-graph memory pools belong to dynamo's compiled code, not to the model.
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _versions() -> tuple[str | None, str | None]:
    try:
        import torch
        import transformers
    except Exception:  # noqa: BLE001
        return None, None
    return transformers.__version__, torch.__version__


def _torch_dtype(dtype: str):
    import torch
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a torch floating dtype (bfloat16, float16, float32)")
    return torch_dtype


def _get_model(config_dir: str, dtype: str, device, seed: int) -> _BuiltModel:
    """The cached model for (config_dir, dtype, device), built on the device with random weights."""
    global _built
    import torch
    import transformers
    from packaging import version

    key = (os.path.abspath(config_dir), dtype, str(device))
    if _built is not None and _built.key == key:
        return _built
    release()
    torch_dtype = _torch_dtype(dtype)
    # transformers 4.56 renamed torch_dtype to dtype (the old name warns in 5.x).
    new_kwarg = version.parse(transformers.__version__).release >= (4, 56)
    dtype_kwarg = {"dtype" if new_kwarg else "torch_dtype": torch_dtype}

    t0 = time.perf_counter()
    config = transformers.AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    # Under the device context every parameter is allocated, and initialized by transformers'
    # normal init, on the GPU in the target dtype: no float32 copy of 16 GB on the host first.
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, **dtype_kwarg)
    model.eval().requires_grad_(False)
    # generate() fills unset arguments from the model's generation config, so a None passed to
    # generate() would fall back to the config's EOS: clear it here so no request stops early.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _built = _BuiltModel(key=key, model=model, build_s=time.perf_counter() - t0)
    return _built


def _static_kwargs(built: _BuiltModel, device) -> dict:
    """generate() arguments for the static cache with a compiled decode step, by transformers version."""
    import transformers

    compile_mode = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs need CUDA
    if hasattr(transformers, "CompileConfig"):
        # 4.47+: generate() compiles the decode forward itself when the cache is static; swapping
        # model.forward as well would nest one compiled function inside another.
        compile_config = transformers.CompileConfig(fullgraph=True, mode=compile_mode)
        if device.type != "cuda":
            compile_config._compile_all_devices = True  # otherwise generate() compiles on accelerators only
        return {"cache_implementation": "static", "compile_config": compile_config}
    if built.compiled_forward is None:
        import torch
        built.compiled_forward = torch.compile(built.model.forward, mode=compile_mode, fullgraph=True)
    return {"cache_implementation": "static"}


def _timed_generate(built: _BuiltModel, input_ids, attention_mask, new_tokens: int, mode: str) -> float:
    """Wall seconds of one generate() of exactly new_tokens greedy tokens per row, device synced."""
    import torch

    model, device = built.model, input_ids.device
    kwargs = _static_kwargs(built, device) if mode == "static" else {}
    swap_forward = mode == "static" and built.compiled_forward is not None
    if swap_forward:
        model.forward = built.compiled_forward
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    finally:
        if swap_forward:
            del model.forward  # the class's forward again, so eager runs stay eager
    got = out.shape[1] - input_ids.shape[1]
    if got != new_tokens:
        raise RuntimeError(f"generate returned {got} new tokens per row, expected {new_tokens}")
    return elapsed


def _compiled_graphs() -> int:
    import torch
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def measure_generate(config_dir: str, *, batch: int, input_len: int, output_len: int, dtype: str = "bfloat16",
                     mode: str = "eager", seed: int = 0, device: str | None = None, warmup: bool = True) -> dict:
    """Times HF generate on random prompts [batch, input_len] for output_len greedy tokens per row.

    elapsed_s is one whole generate; prefill_s one generate of a single token (the prompt forward plus
    generate's own set-up), so decode_step_ms = (elapsed_s - prefill_s) / (output_len - 1). With warmup,
    one untimed run of each comes first, so compilation and CUDA-graph capture are left out. The model
    is built on the first call for (config_dir, dtype, device), its weights seeded by that call's seed,
    and kept for later calls until `release()`. Bad arguments raise ValueError; a runtime failure
    returns the dict with "error" set and None for every number.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}, expected one of {MODES}")
    for name, value in (("batch", batch), ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    transformers_version, torch_version = _versions()
    if torch_version is not None:
        _torch_dtype(dtype)
    result = {"peer": "hf_transformers", "mode": mode, "transformers": transformers_version,
              "torch": torch_version, "batch": batch, "input_len": input_len, "output_len": output_len,
              "dtype": dtype, "device": device, "elapsed_s": None, "output_tokens_per_s": None,
              "prefill_s": None, "decode_step_ms": None, "model_build_s": None, "attn_implementation": None,
              "compiles_during_timing": None, "error": None}
    error = None
    try:
        if torch_version is None:
            raise ImportError("torch and transformers must both import")
        import torch

        dev = torch.device(device or "cuda")
        result["device"] = str(dev)
        built = _get_model(config_dir, dtype, dev, seed)
        result["model_build_s"] = built.build_s
        result["attn_implementation"] = getattr(built.model.config, "_attn_implementation", None)
        vocab = built.model.config.get_text_config().vocab_size
        # A host generator, so the prompts are the same on any device for the same seed.
        gen = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, vocab, (batch, input_len), generator=gen).to(dev)
        attention_mask = torch.ones_like(input_ids)
        # The full-length run goes first: a static cache sized for it is then large enough for the
        # one-token run too, so both attend over the same cache length.
        if warmup:
            _timed_generate(built, input_ids, attention_mask, output_len, mode)
            _timed_generate(built, input_ids, attention_mask, 1, mode)
        graphs_before = _compiled_graphs()
        elapsed = _timed_generate(built, input_ids, attention_mask, output_len, mode)
        prefill = _timed_generate(built, input_ids, attention_mask, 1, mode)
        result.update(
            elapsed_s=elapsed, output_tokens_per_s=batch * output_len / elapsed, prefill_s=prefill,
            decode_step_ms=1e3 * (elapsed - prefill) / (output_len - 1) if output_len > 1 else None,
            compiles_during_timing=_compiled_graphs() - graphs_before)
    except Exception as e:  # noqa: BLE001 - OOM or a compile failure must not stop the benchmark
        lines = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]
    if error is not None:
        # Out of the except block, so the traceback's frames and their tensors are gone.
        for name in ("elapsed_s", "output_tokens_per_s", "prefill_s", "decode_step_ms", "compiles_during_timing"):
            result[name] = None
        result["error"] = error
        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()
    return result


def main() -> None:
    # argparse, not absl: absl flags are process-global, and benchmark_throughput, which imports this
    # module, already defines --input_len and --output_len.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_dir", default=os.path.join(os.path.dirname(__file__), "model_shapes", "llama3-8b"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input_len", type=int, default=128)
    parser.add_argument("--output_len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", default="eager,static", help="Comma-separated, from " + ",".join(MODES))
    parser.add_argument("--device", default=None, help="Default cuda.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for mode in args.modes.split(","):
        print(json.dumps(measure_generate(args.config_dir, batch=args.batch, input_len=args.input_len,
                                          output_len=args.output_len, dtype=args.dtype, mode=mode,
                                          seed=args.seed, device=args.device)), flush=True)
    release()


if __name__ == "__main__":
    main()
