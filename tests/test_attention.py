"""MHA / GQA attention: against an explicit re-derivation, causality, cached decoding."""

import math

import pytest
import torch

from minimoe.attention import Attention, attention_reference
from minimoe.cache import KVCache
from minimoe.config import ModelConfig


def make_cfg(**overrides):
    values = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  attention="mha", n_routed_experts=0, intermediate_size=64,
                  first_k_dense_replace=0, max_position_embeddings=256)
    values.update(overrides)
    return ModelConfig(**values)


def randomise(module, seed=0):
    """Random weights everywhere, including norm gains and biases (so they matter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 2:  # unit-scale activations: std = fan_in^-0.5
                parameter.copy_(noise * parameter.shape[1] ** -0.5)
            elif "norm" in name:  # gains near 1
                parameter.copy_(1.0 + 0.2 * noise)
            else:  # biases
                parameter.copy_(0.2 * noise)
    return module


def rms_by_hand(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def rope_by_hand(x, theta, rotary_dim):
    """x (B, H, T, D) in float64, positions 0..T-1; rotate pairs (i, i + r/2) of the first r dims."""
    out = x.clone()
    half = rotary_dim // 2
    for t in range(x.shape[2]):
        for i in range(half):
            angle = t * theta ** (-2 * i / rotary_dim)
            a, b = x[:, :, t, i], x[:, :, t, i + half]
            out[:, :, t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, :, t, i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def attention_by_hand(attn, cfg, x):
    """The layer re-derived in float64 from its weights (no code from minimoe.attention)."""
    p = {name: value.double() for name, value in attn.state_dict().items()}
    B, T, _ = x.shape
    H, H_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = x.double()

    def linear(name, inp):
        out = inp @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    q, k, v = linear("q_proj", x), linear("k_proj", x), linear("v_proj", x)
    if cfg.qk_norm == "full":
        q = rms_by_hand(q, p["q_norm.weight"], cfg.rms_norm_eps)
        k = rms_by_hand(k, p["k_norm.weight"], cfg.rms_norm_eps)
    q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
    if cfg.qk_norm == "per_head":
        q = rms_by_hand(q, p["q_norm.weight"], cfg.rms_norm_eps)
        k = rms_by_hand(k, p["k_norm.weight"], cfg.rms_norm_eps)
    q = rope_by_hand(q.transpose(1, 2), cfg.rope_theta, cfg.rotary_dim)  # (B, H, T, D)
    k = rope_by_hand(k.transpose(1, 2), cfg.rope_theta, cfg.rotary_dim)  # (B, H_kv, T, D)
    v = v.transpose(1, 2)
    group = H // H_kv
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for head in range(H):
        kv_head = head // group
        out[:, head] = attention_reference(q[:, head:head + 1], k[:, kv_head:kv_head + 1],
                                           v[:, kv_head:kv_head + 1], D**-0.5, causal_offset=0)[:, 0]
    out = out.transpose(1, 2).reshape(B, T, H * D)
    return out @ p["o_proj.weight"].T


def test_attention_reference_matches_naive_loop():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 6)
    got = attention_reference(q, k, v, scale=0.7, causal_offset=2)
    for h in range(2):
        for i in range(3):
            logits = [(q[0, h, i] @ k[0, h, j]).item() * 0.7 for j in range(2 + i + 1)]
            top = max(logits)
            weights = [math.exp(a - top) for a in logits]
            total = sum(weights)
            expected = sum(w / total * v[0, h, j] for j, w in enumerate(weights))
            torch.testing.assert_close(got[0, h, i], expected, atol=1e-5, rtol=1e-5)


CASES = {
    "mha": dict(),
    "gqa-per-head-norm": dict(attention="gqa", num_key_value_heads=2, qk_norm="per_head"),
    "mqa-full-norm": dict(attention="gqa", num_key_value_heads=1, qk_norm="full"),
    "partial-rotary": dict(attention="gqa", num_key_value_heads=2, qk_norm="per_head",
                           partial_rotary_factor=0.5),
    "bias": dict(attention_bias=True, qk_norm="full"),
    "head-dim-not-hidden-over-heads": dict(head_dim=24, attention="gqa", num_key_value_heads=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_explicit_derivation(case):
    cfg = make_cfg(**CASES[case])
    attn = randomise(Attention(cfg, layer_index=0))
    x = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    got = attn(x, torch.arange(7))
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), attention_by_hand(attn, cfg, x), atol=1e-5, rtol=1e-5)


def test_parameter_names_and_shapes():
    cfg = make_cfg(attention="gqa", num_key_value_heads=2, qk_norm="per_head", attention_bias=True)
    shapes = {name: tuple(p.shape) for name, p in Attention(cfg, 0).named_parameters()}
    assert shapes == {
        "q_proj.weight": (64, 64), "q_proj.bias": (64,),
        "k_proj.weight": (32, 64), "k_proj.bias": (32,),
        "v_proj.weight": (32, 64), "v_proj.bias": (32,),
        "o_proj.weight": (64, 64),
        "q_norm.weight": (16,), "k_norm.weight": (16,),
    }
    full = {n: tuple(p.shape) for n, p in Attention(make_cfg(attention="gqa", num_key_value_heads=2,
                                                             qk_norm="full"), 0).named_parameters()}
    assert full["q_norm.weight"] == (64,) and full["k_norm.weight"] == (32,)
    assert not any("norm" in n for n, _ in Attention(make_cfg(), 0).named_parameters())


def test_gqa_with_all_kv_heads_equals_mha():
    mha = randomise(Attention(make_cfg(), 0))
    gqa = Attention(make_cfg(attention="gqa", num_key_value_heads=4), 0)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 6, 64)
    torch.testing.assert_close(gqa(x, torch.arange(6)), mha(x, torch.arange(6)))


def test_future_tokens_do_not_change_earlier_outputs():
    attn = randomise(Attention(make_cfg(attention="gqa", num_key_value_heads=2), 0))
    x = torch.randn(1, 9, 64)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 4, 64)
    before, after = attn(x, torch.arange(9)), attn(changed, torch.arange(9))
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("case", ["mha", "partial-rotary", "mqa-full-norm"])
def test_cached_decoding_equals_full_forward(case):
    cfg = make_cfg(**CASES[case])
    layers = [randomise(Attention(cfg, i), seed=i) for i in range(2)]
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(3))
    full = layers[1](layers[0](x, torch.arange(10)), torch.arange(10))

    cache = KVCache(num_layers=2)
    pieces = []
    for start, stop in [(0, 4), (4, 5), (5, 7), (7, 8), (8, 9), (9, 10)]:  # prefill, 1s and a 2
        positions = torch.arange(start, stop)
        h = layers[0](x[:, start:stop], positions, cache)
        pieces.append(layers[1](h, positions, cache))
        cache.advance(stop - start)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    H_kv, D = cfg.num_key_value_heads, cfg.head_dim
    assert cache.layers[0]["k"].shape == (2, 10, H_kv, D)
    assert cache.num_elements_per_token() == 2 * 2 * H_kv * D


def test_deepseek_yarn_multiplies_the_softmax_scale():
    yarn = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    attn = Attention(make_cfg(rope_scaling=yarn), 0)
    assert attn.scale == pytest.approx(16**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert Attention(make_cfg(), 0).scale == pytest.approx(0.25)


def test_bf16_runs_and_keeps_dtype():
    attn = Attention(make_cfg(qk_norm="per_head"), 0).to(torch.bfloat16)
    y = attn(torch.randn(1, 5, 64, dtype=torch.bfloat16), torch.arange(5))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_bad_construction_is_a_clear_error():
    with pytest.raises(ValueError, match="MultiHeadLatentAttention"):
        Attention(make_cfg(attention="mla"), 0)
    with pytest.raises(ValueError, match="multiple of"):
        make_cfg(attention="gqa", num_key_value_heads=3)
    with pytest.raises(ValueError, match="layer_index"):
        Attention(make_cfg(), -1)
