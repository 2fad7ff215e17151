"""Self-consistency checks for the golden-parity fixtures in tests/fixtures/.

The fixtures are produced by tools/make_golden_fixtures.py with Hugging Face
transformers on torch (CPU, float32); see that script's docstring to regenerate.
These tests need only numpy + safetensors + json (no torch, no transformers):

* structure: every family dir has config.json, weights (single file or index +
  shards), golden.json with 4 prompts, 12 greedy tokens each, full-vocab logits,
  and argmax(last_logits[i]) == greedy_tokens[i][0];
* an independent float64 numpy forward pass, built only from config.json and the
  safetensors files, reproduces the goldens (last-position logits, llama3's
  all-position logits, and the whole greedy continuation). This pins down how the
  checkpoints are meant to be read (rope_parameters, GQA/MQA, head_dim, tying,
  qkv bias, mixtral expert names and routing) independently of the JAX engine.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["llama3", "llama3_sharded", "llama2", "mistral", "qwen2", "mixtral"]
EXPECTED_PROMPT_LENGTHS = [1, 7, 33, 70]
NUM_NEW_TOKENS = 12


def _dir(fam):
    return os.path.join(FIXTURES, fam)


def _load_json(fam, name):
    with open(os.path.join(_dir(fam), name)) as f:
        return json.load(f)


def _load_weights(fam):
    d = _dir(fam)
    single = os.path.join(d, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = _load_json(fam, "model.safetensors.index.json")
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(load_file(os.path.join(d, shard)))
    assert set(weights) == set(index["weight_map"])
    return weights


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("fam", FAMILIES)
def test_fixture_files_present(fam):
    d = _dir(fam)
    assert os.path.isfile(os.path.join(d, "config.json"))
    assert os.path.isfile(os.path.join(d, "golden.json"))
    files = os.listdir(d)
    if fam == "llama3_sharded":
        assert "model.safetensors.index.json" in files
        index = _load_json(fam, "model.safetensors.index.json")
        shards = set(index["weight_map"].values())
        assert len(shards) > 1
        for s in shards:
            assert os.path.isfile(os.path.join(d, s)), s
    else:
        assert os.path.isfile(os.path.join(d, "model.safetensors"))


@pytest.mark.parametrize("fam", FAMILIES)
def test_golden_shapes_and_argmax(fam):
    cfg = _load_json(fam, "config.json")
    g = _load_json(fam, "golden.json")
    vocab = cfg["vocab_size"]
    assert len(g["prompts"]) == 4
    assert [len(p) for p in g["prompts"]] == EXPECTED_PROMPT_LENGTHS
    for p in g["prompts"]:
        assert p[0] == cfg["bos_token_id"]
        assert all(isinstance(t, int) and 0 <= t < vocab for t in p)
    assert len(g["greedy_tokens"]) == 4
    for toks in g["greedy_tokens"]:
        assert len(toks) == NUM_NEW_TOKENS
        assert all(isinstance(t, int) and 0 <= t < vocab for t in toks)
    assert len(g["last_logits"]) == 4
    for i, row in enumerate(g["last_logits"]):
        assert len(row) == vocab
        row = np.asarray(row, dtype=np.float64)
        assert np.all(np.isfinite(row))
        assert int(np.argmax(row)) == g["greedy_tokens"][i][0]
        top2 = np.sort(row)[-2:]
        assert top2[1] - top2[0] >= g["min_top2_gap"] * 0.999
    assert g["min_top2_gap"] >= 1e-3
    for key in ("transformers_version", "torch_version"):
        assert isinstance(g[key], str) and g[key]
    if fam.startswith("llama3"):
        all_logits = np.asarray(g["all_logits_prompt2"])
        assert all_logits.shape == (len(g["prompts"][2]), vocab)
        np.testing.assert_array_equal(all_logits[-1], np.asarray(g["last_logits"][2]))


def test_sharded_copy_matches_single_file():
    a, b = _load_weights("llama3"), _load_weights("llama3_sharded")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert _load_json("llama3", "golden.json") == _load_json("llama3_sharded", "golden.json")
    ca, cb = _load_json("llama3", "config.json"), _load_json("llama3_sharded", "config.json")
    assert ca == cb


@pytest.mark.parametrize("fam", FAMILIES)
def test_weights_float32_and_tying(fam):
    cfg = _load_json(fam, "config.json")
    w = _load_weights(fam)
    assert all(v.dtype == np.float32 for v in w.values())
    assert ("lm_head.weight" in w) == (not cfg.get("tie_word_embeddings", False))
    assert w["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])


# ------------------------------------------------- independent numpy forward


def _inv_freq(cfg, head_dim):
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rtype == "default":
        return inv
    if rtype == "linear":
        return inv / rp["factor"]
    if rtype == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return np.where(medium, smoothed, out)
    raise NotImplementedError(rtype)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rope(x, cos, sin):  # x: [heads, seq, hd], HF rotate_half layout
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def _forward(cfg, w, ids):
    """float64 numpy reference forward; returns logits [seq, vocab]."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    freqs = pos[:, None] * _inv_freq(cfg, hd)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    mask = np.triu(np.full((T, T), -np.inf), k=1)

    x = W["model.embed_tokens.weight"][np.asarray(ids)]
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)

        def proj(name, n):
            y = h @ W[p + f"self_attn.{name}.weight"].T
            b = W.get(p + f"self_attn.{name}.bias")
            if b is not None:
                y = y + b
            return y.reshape(T, n, hd).transpose(1, 0, 2)

        q, k, v = proj("q_proj", nh), proj("k_proj", nkv), proj("v_proj", nkv)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        x = x + a @ W[p + "self_attn.o_proj.weight"].T

        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if cfg.get("num_local_experts"):
            m = p + "block_sparse_moe."
            E, k_top = cfg["num_local_experts"], cfg["num_experts_per_tok"]
            r = h @ W[m + "gate.weight"].T
            r = np.exp(r - r.max(-1, keepdims=True))
            r /= r.sum(-1, keepdims=True)
            out = np.zeros_like(h)
            for t in range(T):
                top = np.argsort(-r[t], kind="stable")[:k_top]
                wts = r[t, top] / r[t, top].sum()
                for e, wt in zip(top, wts):
                    ep = m + f"experts.{e}."
                    y = _silu(h[t] @ W[ep + "w1.weight"].T) * (h[t] @ W[ep + "w3.weight"].T)
                    out[t] += wt * (y @ W[ep + "w2.weight"].T)
            assert E == sum(1 for kk in W if kk.startswith(m + "experts.") and kk.endswith(".w1.weight"))
        else:
            g = h @ W[p + "mlp.gate_proj.weight"].T
            u = h @ W[p + "mlp.up_proj.weight"].T
            out = (_silu(g) * u) @ W[p + "mlp.down_proj.weight"].T
        x = x + out

    x = _rms(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


@pytest.mark.parametrize("fam", FAMILIES)
def test_numpy_reference_reproduces_goldens(fam):
    cfg = _load_json(fam, "config.json")
    g = _load_json(fam, "golden.json")
    w = _load_weights(fam)
    for i, prompt in enumerate(g["prompts"]):
        seq = list(prompt)
        for step in range(NUM_NEW_TOKENS):
            logits = _forward(cfg, w, seq)
            if step == 0:
                np.testing.assert_allclose(logits[-1], g["last_logits"][i], rtol=0, atol=2e-4)
                if i == 2 and "all_logits_prompt2" in g:
                    np.testing.assert_allclose(logits, g["all_logits_prompt2"], rtol=0, atol=2e-4)
            nxt = int(np.argmax(logits[-1]))
            assert nxt == g["greedy_tokens"][i][step], (fam, i, step)
            seq.append(nxt)
