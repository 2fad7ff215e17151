"""Generate the golden-parity fixtures for jaxserve from the reference
implementation (Hugging Face transformers on torch, CPU, float32).

For each tiny model family (llama3, llama2, mistral, qwen2, mixtral) this
script builds a randomly initialised model, re-initialises every parameter
with numpy (``np.random.default_rng(seed)``; std 0.2 for weights and biases,
``1 + 0.1 * N(0, 1)`` for norm weights, so that logits are well separated and
greedy decoding has no near-ties), saves it with ``save_pretrained`` as
float32 safetensors into ``<out>/<family>/`` and writes ``golden.json`` there:

* ``prompts``           4 prompts of token ids (lengths 1, 7, 33, 70; bos=1 first)
* ``last_logits``       logits at the last prompt position, full vocab, float32,
                        rounded to 7 significant digits
* ``greedy_tokens``     12 greedy new tokens per prompt, from a plain manual loop
                        (argmax of the last logits, append, re-run the whole
                        sequence; never stops early, eos included)
* ``min_top2_gap``      min over all prompts and greedy steps of top1 - top2 logit
* ``all_logits_prompt2`` (llama3 only) logits at every position of the 33-token prompt
* ``min_router_gap``    (mixtral only) min gap between the k-th and (k+1)-th router
                        logit over every token/layer seen, so expert selection is
                        robust too
* ``transformers_version``, ``torch_version``, ``family``, ``model_class``, ``seed``

The llama3 model is also saved a second time, sharded into several files
(``model.safetensors.index.json`` + shards), as ``<out>/llama3_sharded/`` with
the same golden.json.

Goldens are computed from the model *reloaded from disk* (``from_pretrained``),
and checked against the in-memory model, so they describe exactly what was saved.
If any greedy step (or mixtral routing decision) is closer to a tie than the
thresholds below, the next seed is tried.

Regenerate (needs Python 3.11 with torch CPU + transformers; nothing is downloaded):

    python3 -m venv /work/venv311
    /work/venv311/bin/pip install torch==2.13.0 transformers safetensors numpy
    /work/venv311/bin/python tools/make_golden_fixtures.py --out tests/fixtures

Then run ``python -m pytest tests/test_golden_fixtures.py`` (numpy + safetensors only).
Outputs are deterministic for a given torch/transformers version.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 256
BOS, EOS = 1, 2
PROMPT_LENGTHS = (1, 7, 33, 70)
PROMPT_SEED = 20240601
NUM_NEW_TOKENS = 12
WEIGHT_STD = 0.2
NORM_STD = 0.1
# A greedy step whose top-1/top-2 logit gap is below this makes the seed rejected.
MIN_TOP2_GAP = 1e-2
# A mixtral routing decision whose k-th/(k+1)-th router-logit gap is below this
# makes the seed rejected.
MIN_ROUTER_GAP = 1e-3
MAX_SEED_TRIES = 50
SHARD_SIZE = "60KB"

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=BOS,
    eos_token_id=EOS,
    hidden_act="silu",
    attention_dropout=0.0,
)

_V5 = int(transformers.__version__.split(".")[0]) >= 5


def _rope_kwargs(theta: float, scaling: dict | None) -> dict:
    """transformers>=5 takes `rope_parameters` (rope_theta inside); v4 takes
    `rope_theta` + `rope_scaling`."""
    if _V5:
        params = {"rope_type": "default", "rope_theta": theta}
        if scaling:
            params.update(scaling)
        return {"rope_parameters": params}
    kw = {"rope_theta": theta}
    if scaling:
        kw["rope_scaling"] = dict(scaling)
    return kw


def family_specs() -> dict:
    return {
        "llama3": (
            LlamaForCausalLM,
            LlamaConfig,
            dict(
                COMMON,
                num_key_value_heads=2,
                head_dim=16,
                tie_word_embeddings=False,
                attention_bias=False,
                mlp_bias=False,
                **_rope_kwargs(
                    500000.0,
                    dict(
                        rope_type="llama3",
                        factor=8.0,
                        low_freq_factor=1.0,
                        high_freq_factor=4.0,
                        # 64 (not 32): with head_dim 16 and theta 5e5 the wavelengths are
                        # 6.3, 32.4, 167, ...; 64 puts 32.4 inside the smoothing band
                        # [64/4, 64/1], so all three llama3 branches (keep, smooth,
                        # divide by factor) are exercised. 32 would leave the band empty.
                        original_max_position_embeddings=64,
                    ),
                ),
            ),
        ),
        "llama2": (
            LlamaForCausalLM,
            LlamaConfig,
            dict(
                COMMON,
                num_key_value_heads=4,
                head_dim=16,
                tie_word_embeddings=True,
                attention_bias=False,
                mlp_bias=False,
                **_rope_kwargs(10000.0, dict(rope_type="linear", factor=2.0)),
            ),
        ),
        "mistral": (
            MistralForCausalLM,
            MistralConfig,
            dict(
                COMMON,
                num_key_value_heads=1,
                head_dim=32,
                sliding_window=None,
                tie_word_embeddings=False,
                **_rope_kwargs(10000.0, None),
            ),
        ),
        "qwen2": (
            Qwen2ForCausalLM,
            Qwen2Config,
            dict(
                COMMON,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                use_sliding_window=False,
                sliding_window=None,
                **_rope_kwargs(10000.0, None),
            ),
        ),
        "mixtral": (
            MixtralForCausalLM,
            MixtralConfig,
            dict(
                COMMON,
                intermediate_size=96,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                sliding_window=None,
                router_jitter_noise=0.0,
                output_router_logits=False,
                tie_word_embeddings=False,
                **_rope_kwargs(1000000.0, None),
            ),
        ),
    }


def make_prompts() -> list[list[int]]:
    rng = np.random.default_rng(PROMPT_SEED)
    prompts = []
    for n in PROMPT_LENGTHS:
        ids = [BOS] + [int(x) for x in rng.integers(3, VOCAB, size=n - 1)]
        prompts.append(ids)
    return prompts


def build_model(model_cls, config_cls, cfg_kwargs: dict, seed: int):
    torch.manual_seed(seed)
    config = config_cls(**cfg_kwargs)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        # named_parameters() de-duplicates tied tensors (lm_head == embed_tokens).
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("norm.weight"):
                vals = 1.0 + NORM_STD * rng.standard_normal(shape)
            else:  # weights, biases, router, experts
                vals = WEIGHT_STD * rng.standard_normal(shape)
            p.copy_(torch.from_numpy(vals.astype(np.float32)))
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    return model


class RouterProbe:
    """Records, for MoE gates, the min gap between the k-th and (k+1)-th router logit."""

    def __init__(self, model):
        self.min_gap = float("inf")
        self.handles = []
        k = getattr(model.config, "num_experts_per_tok", None)
        for name, mod in model.named_modules():
            if name.endswith("mlp.gate") or name.endswith("block_sparse_moe.gate"):
                self.handles.append(mod.register_forward_hook(self._hook(k)))

    def _hook(self, k):
        def hook(_mod, _inp, out):
            logits = out[0] if isinstance(out, tuple) else out
            srt = torch.sort(logits.reshape(-1, logits.shape[-1]).float(), dim=-1, descending=True).values
            gap = (srt[:, k - 1] - srt[:, k]).min().item()
            self.min_gap = min(self.min_gap, gap)

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def forward_logits(model, ids: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float()  # [seq, vocab]


@torch.no_grad()
def compute_golden(model, prompts, all_logits_index: int | None):
    last_logits, greedy, gaps = [], [], []
    all_logits = None
    for i, prompt in enumerate(prompts):
        seq = list(prompt)
        toks = []
        for step in range(NUM_NEW_TOKENS):
            logits = forward_logits(model, seq)
            if step == 0:
                last_logits.append(logits[-1].numpy().copy())
                if i == all_logits_index:
                    all_logits = logits.numpy().copy()
            top2 = torch.topk(logits[-1], 2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(logits[-1]))
            toks.append(nxt)
            seq.append(nxt)  # never stop early, even on eos
        greedy.append(toks)
    return last_logits, greedy, min(gaps), all_logits


def r7(x) -> float:
    return float(f"{float(x):.7g}")


def save_model(model, path: str, **kw):
    if os.path.isdir(path):
        shutil.rmtree(path)
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kw["safe_serialization"] = True
    model.save_pretrained(path, **kw)


def make_family(family, spec, prompts, out_dir, seed0):
    model_cls, config_cls, cfg_kwargs = spec
    all_idx = PROMPT_LENGTHS.index(33) if family == "llama3" else None
    for attempt in range(MAX_SEED_TRIES):
        seed = seed0 + attempt
        model = build_model(model_cls, config_cls, cfg_kwargs, seed)
        probe = RouterProbe(model)
        last_logits, greedy, gap, all_logits = compute_golden(model, prompts, all_idx)
        probe.close()
        router_gap = probe.min_gap if probe.handles else None
        ok = gap >= MIN_TOP2_GAP and (router_gap is None or router_gap >= MIN_ROUTER_GAP)
        print(f"[{family}] seed={seed} min_top2_gap={gap:.4g} router_gap={router_gap} ok={ok}", flush=True)
        if ok:
            break
    else:
        raise RuntimeError(f"{family}: no robust seed found in {MAX_SEED_TRIES} tries")

    fam_dir = os.path.join(out_dir, family)
    save_model(model, fam_dir)
    dirs = [(family, fam_dir)]
    if family == "llama3":
        sh_dir = os.path.join(out_dir, "llama3_sharded")
        save_model(model, sh_dir, max_shard_size=SHARD_SIZE)
        assert os.path.exists(os.path.join(sh_dir, "model.safetensors.index.json")), "sharding did not happen"
        dirs.append(("llama3_sharded", sh_dir))

    golden = None
    for name, d in dirs:
        # Goldens come from the checkpoint on disk; it must reproduce the in-memory model.
        reloaded = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        probe = RouterProbe(reloaded)
        ll2, gr2, gap2, al2 = compute_golden(reloaded, prompts, all_idx)
        probe.close()
        assert gr2 == greedy, f"{name}: reloaded greedy differs"
        for a, b in zip(ll2, last_logits):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        if golden is None:
            # The single-file checkpoint defines the goldens; the sharded copy
            # only has to agree with them (it gets the identical golden.json).
            golden = {
                "family": family,
                "model_class": model_cls.__name__,
                "seed": seed,
                "weight_std": WEIGHT_STD,
                "prompts": prompts,
                "greedy_tokens": gr2,
                "last_logits": [[r7(x) for x in row] for row in ll2],
                "min_top2_gap": r7(gap2),
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
            }
            if probe.handles:
                golden["min_router_gap"] = r7(probe.min_gap)
            if al2 is not None:
                golden["all_logits_prompt2"] = [[r7(x) for x in row] for row in al2]
        with open(os.path.join(d, "golden.json"), "w") as f:
            json.dump(golden, f, separators=(",", ":"))
            f.write("\n")
        print(f"[{name}] wrote {sorted(os.listdir(d))}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--families", nargs="*", default=None, help="subset of families (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    prompts = make_prompts()
    specs = family_specs()
    fams = args.families or list(specs)
    for k, fam in enumerate(specs):
        if fam in fams:
            make_family(fam, specs[fam], prompts, out_dir, seed0=1000 * (k + 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
