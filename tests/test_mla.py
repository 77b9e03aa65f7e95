"""Multi-head Latent Attention: against a per-head re-derivation, cached decoding, cache size."""

import math

import pytest
import torch

from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.mla import MultiHeadLatentAttention

V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def make_cfg(**overrides):
    values = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12,
                  qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=0, intermediate_size=64,
                  first_k_dense_replace=0, max_position_embeddings=256)
    values.update(overrides)
    return ModelConfig(**values)


def randomise(module, seed=0):
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


def rms_by_hand(x, weight, eps=1e-6):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def rope_vector(x, position, theta):
    """Rotate one vector (r,) at one position; pairs (i, i + r/2), frequencies theta^(-2i/r)."""
    r = x.shape[-1]
    out = x.clone()
    for i in range(r // 2):
        angle = position * theta ** (-2 * i / r)
        out[i] = x[i] * math.cos(angle) - x[i + r // 2] * math.sin(angle)
        out[i + r // 2] = x[i] * math.sin(angle) + x[i + r // 2] * math.cos(angle)
    return out


def mla_by_hand(mla, cfg, x):
    """DeepSeek-V2 §2.1.2-2.1.3 written out per token and per head, in float64."""
    p = {name: value.double() for name, value in mla.state_dict().items()}
    B, T, _ = x.shape
    H, nope, rope, v_dim = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                            cfg.v_head_dim)
    x = x.double()

    def linear(name, inp):
        out = inp @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    if cfg.q_lora_rank is None:
        q_all = linear("q_proj", x)
    else:
        c_q = rms_by_hand(linear("q_a_proj", x), p["q_a_layernorm.weight"])
        q_all = linear("q_b_proj", c_q)  # W^UQ and W^QR stacked per head
    if cfg.mla_scale_q_lora:  # LongCat-Flash: the whole up-projected query, before RoPE
        q_all = q_all * math.sqrt(cfg.hidden_size / cfg.q_lora_rank)
    down = linear("kv_a_proj_with_mqa", x)
    c_kv = rms_by_hand(down[..., :cfg.kv_lora_rank], p["kv_a_layernorm.weight"])  # the latent
    if cfg.mla_scale_kv_lora:  # LongCat-Flash: the normalised latent (keys and values), not k^R
        c_kv = c_kv * math.sqrt(cfg.hidden_size / cfg.kv_lora_rank)
    k_rope_raw = down[..., cfg.kv_lora_rank:]  # W^KR h, one for all heads
    w_up = p["kv_b_proj.weight"].view(H, nope + v_dim, cfg.kv_lora_rank)
    w_uk, w_uv = w_up[:, :nope], w_up[:, nope:]  # (H, nope, d_c), (H, v_dim, d_c)
    scale = (nope + rope) ** -0.5

    out = torch.zeros(B, T, H * v_dim, dtype=torch.float64)
    for b in range(B):
        k_rope = [rope_vector(k_rope_raw[b, j], j, cfg.rope_theta) for j in range(T)]
        for h in range(H):
            head_q = q_all[b].view(T, H, nope + rope)[:, h]  # (T, nope + rope)
            keys = [torch.cat([w_uk[h] @ c_kv[b, j], k_rope[j]]) for j in range(T)]
            values = [w_uv[h] @ c_kv[b, j] for j in range(T)]
            for i in range(T):
                query = torch.cat([head_q[i, :nope], rope_vector(head_q[i, nope:], i, cfg.rope_theta)])
                logits = torch.stack([query @ keys[j] * scale for j in range(i + 1)])
                weights = torch.softmax(logits, dim=0)
                out[b, i, h * v_dim:(h + 1) * v_dim] = sum(weights[j] * values[j] for j in range(i + 1))
    return linear("o_proj", out)


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=None), dict(attention_bias=True),
                                       dict(num_attention_heads=2, v_head_dim=20)],
                         ids=["lora-q", "full-rank-q", "bias", "wide-v"])
def test_mla_matches_per_head_derivation(overrides):
    cfg = make_cfg(**overrides)
    mla = randomise(MultiHeadLatentAttention(cfg, layer_index=0))
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1))
    got = mla(x, torch.arange(6))
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), mla_by_hand(mla, cfg, x), atol=1e-5, rtol=1e-5)


def test_parameter_names_and_shapes():
    shapes = {n: tuple(p.shape) for n, p in
              MultiHeadLatentAttention(make_cfg(attention_bias=True), 0).named_parameters()}
    assert shapes == {
        "q_a_proj.weight": (24, 64), "q_a_proj.bias": (24,),
        "q_a_layernorm.weight": (24,),
        "q_b_proj.weight": (4 * 20, 24),
        "kv_a_proj_with_mqa.weight": (16 + 8, 64), "kv_a_proj_with_mqa.bias": (24,),
        "kv_a_layernorm.weight": (16,),
        "kv_b_proj.weight": (4 * (12 + 10), 16),
        "o_proj.weight": (64, 4 * 10), "o_proj.bias": (64,),
    }
    lite = {n for n, _ in MultiHeadLatentAttention(make_cfg(q_lora_rank=None), 0).named_parameters()}
    assert "q_proj.weight" in lite and not any(n.startswith("q_a") or n.startswith("q_b") for n in lite)


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_cached_decoding_equals_full_forward(q_lora_rank):
    cfg = make_cfg(q_lora_rank=q_lora_rank)
    layers = [randomise(MultiHeadLatentAttention(cfg, i), seed=i) for i in range(2)]
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    full = layers[1](layers[0](x, torch.arange(9)), torch.arange(9))

    cache = KVCache(num_layers=2)
    pieces = []
    for start, stop in [(0, 3), (3, 4), (4, 6), (6, 7), (7, 8), (8, 9)]:
        positions = torch.arange(start, stop)
        h = layers[0](x[:, start:stop], positions, cache)
        pieces.append(layers[1](h, positions, cache))
        cache.advance(stop - start)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_holds_only_the_latent_and_the_rope_key():
    cfg = make_cfg()
    mla = randomise(MultiHeadLatentAttention(cfg, 0))
    cache = KVCache(num_layers=1)
    mla(torch.randn(3, 5, 64), torch.arange(5), cache)
    assert set(cache.layers[0]) == {"c_kv", "k_pe"}
    assert cache.layers[0]["c_kv"].shape == (3, 5, 16)
    assert cache.layers[0]["k_pe"].shape == (3, 5, 8)
    assert cache.num_elements_per_token() == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    # the cached latent is normalised: unit RMS before the gain, and the gain is 1 here
    fresh = MultiHeadLatentAttention(cfg, 0)
    cache = KVCache(num_layers=1)
    fresh(torch.randn(1, 4, 64), torch.arange(4), cache)
    rms = cache.layers[0]["c_kv"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)


def test_future_tokens_do_not_change_earlier_outputs():
    mla = randomise(MultiHeadLatentAttention(make_cfg(), 0))
    x = torch.randn(1, 8, 64)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 4, 64)
    before, after = mla(x, torch.arange(8)), mla(changed, torch.arange(8))
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_deepseek_v3_softmax_scale():
    cfg = make_cfg(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=8, num_attention_heads=1,
                   rope_scaling=dict(V3_YARN), max_position_embeddings=163840)
    assert MultiHeadLatentAttention(cfg, 0).scale == pytest.approx(0.135234, abs=1e-6)
    assert MultiHeadLatentAttention(make_cfg(), 0).scale == pytest.approx(20**-0.5)


def test_bad_construction_is_a_clear_error():
    with pytest.raises(ValueError, match="attention='mla'"):
        MultiHeadLatentAttention(make_cfg(attention="mha"), 0)
