"""MLA inference modes: naive (per-head K/V cache) and absorbed (latent cache, W^UK/W^UV folded)
against the reference forward and a per-head re-derivation; cache sizes; LongCat-Flash scales."""

import math

import pytest
import torch

from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.mla import MultiHeadLatentAttention
from test_mla import make_cfg, mla_by_hand, randomise

MODES = ["latent", "naive", "absorbed"]
VARIANTS = {
    "lora-q": dict(),
    "full-rank-q": dict(q_lora_rank=None),  # DeepSeek-V2-Lite
    "bias": dict(attention_bias=True),
    "wide-v": dict(num_attention_heads=2, v_head_dim=20),
    "longcat-scales": dict(mla_scale_q_lora=True, mla_scale_kv_lora=True),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_matches_per_head_derivation(mode, variant):
    cfg = make_cfg(**VARIANTS[variant])
    mla = randomise(MultiHeadLatentAttention(cfg, layer_index=0))
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1))
    expected = mla_by_hand(mla, cfg, x)
    got = mla(x, torch.arange(6), mode=mode)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    got = mla(x, torch.arange(6), KVCache(1), mode=mode)  # prefill into an empty cache
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_absorption_is_exact_algebra_in_float64():
    cfg = make_cfg(mla_scale_q_lora=True, mla_scale_kv_lora=True)
    mla = randomise(MultiHeadLatentAttention(cfg, 0)).double()
    x = torch.randn(1, 7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    naive = mla(x, torch.arange(7), mode="naive")
    absorbed = mla(x, torch.arange(7), mode="absorbed")
    torch.testing.assert_close(absorbed, naive, atol=1e-12, rtol=1e-12)
    # against the derivation only to float32 precision: the rotary tables are float32 buffers
    torch.testing.assert_close(absorbed, mla_by_hand(mla, cfg, x), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["lora-q", "full-rank-q", "longcat-scales"])
def test_step_by_step_decoding_equals_full_forward(mode, variant):
    cfg = make_cfg(**VARIANTS[variant])
    layers = [randomise(MultiHeadLatentAttention(cfg, i), seed=i) for i in range(2)]
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    full = layers[1](layers[0](x, torch.arange(9)), torch.arange(9))  # reference: no cache

    cache = KVCache(num_layers=2)
    pieces = []
    for start, stop in [(0, 3), (3, 4), (4, 6), (6, 7), (7, 8), (8, 9)]:  # prefill, then steps
        positions = torch.arange(start, stop)
        h = layers[0](x[:, start:stop], positions, cache, mode=mode)
        pieces.append(layers[1](h, positions, cache, mode=mode))
        cache.advance(stop - start)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_mode_attribute_and_truncate_rollback():
    cfg = make_cfg()
    mla = randomise(MultiHeadLatentAttention(cfg, 0))
    assert mla.mla_mode == "latent"  # the default is unchanged
    x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(4))
    full = mla(x, torch.arange(8))
    for mode in ("naive", "absorbed"):
        mla.mla_mode = mode
        cache = KVCache(1)
        mla(x[:, :5], torch.arange(5), cache)
        cache.advance(5)
        mla(torch.randn(1, 2, 64), torch.arange(5, 7), cache)  # drafted tokens, rejected
        cache.advance(2)
        cache.truncate(5)
        out = mla(x[:, 5:], torch.arange(5, 8), cache)
        torch.testing.assert_close(out, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_latent_prefill_then_absorbed_decode_share_one_cache():
    cfg = make_cfg()
    mla = randomise(MultiHeadLatentAttention(cfg, 0))
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(5))
    full = mla(x, torch.arange(6))
    cache = KVCache(1)
    mla(x[:, :4], torch.arange(4), cache, mode="latent")
    out = torch.cat([mla(x[:, t:t + 1], torch.arange(t, t + 1), cache, mode="absorbed")
                     for t in (4, 5)], dim=1)
    torch.testing.assert_close(out, full[:, 4:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="per-head k and v"):
        mla(x[:, :1], torch.arange(1), cache, mode="naive")
    with pytest.raises(ValueError, match="mode must be one of"):
        mla(x, torch.arange(6), mode="fast")


def test_cache_sizes_per_token_per_layer():
    cfg = make_cfg()  # H 4, d_c 16, rope 8, nope 12, v 10
    mla = randomise(MultiHeadLatentAttention(cfg, 0))
    x = torch.randn(3, 5, 64)
    absorbed, naive = KVCache(1), KVCache(1)
    mla(x, torch.arange(5), absorbed, mode="absorbed")
    mla(x, torch.arange(5), naive, mode="naive")
    assert absorbed.num_elements_per_token() == 16 + 8 == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert naive.num_elements_per_token() == 4 * (20 + 10)  # H * (qk_head_dim + v_head_dim)
    assert naive.layers[0]["k"].shape == (3, 5, 4, 20)  # (B, T, H, qk_head_dim)
    assert naive.layers[0]["v"].shape == (3, 5, 4, 10)  # (B, T, H, v_head_dim)
    assert set(absorbed.layers[0]) == {"c_kv", "k_pe"}


def test_absorbed_decoding_never_builds_per_head_keys_or_values():
    mla = randomise(MultiHeadLatentAttention(make_cfg(), 0))

    def forbid(*_):
        raise AssertionError("kv_b_proj was applied to the latent")

    handle = mla.kv_b_proj.register_forward_hook(forbid)
    try:
        cache = KVCache(1)
        mla(torch.randn(1, 4, 64), torch.arange(4), cache, mode="absorbed")
        mla(torch.randn(1, 1, 64), torch.arange(4, 5), cache, mode="absorbed")
        with pytest.raises(AssertionError, match="kv_b_proj"):
            mla(torch.randn(1, 1, 64), torch.arange(1), mode="naive")
    finally:
        handle.remove()


def test_longcat_scale_factors():
    preset = ModelConfig.preset("longcat-flash")
    assert preset.mla_scale_q_lora and preset.mla_scale_kv_lora
    for name in ("deepseek-v3", "deepseek-v2-lite", "toy"):
        other = ModelConfig.preset(name)
        assert not other.mla_scale_q_lora and not other.mla_scale_kv_lora
    # LongCat's widths, two heads: sqrt(6144/1536) = 2, sqrt(6144/512) = sqrt(12)
    small = preset.replace(num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                           max_position_embeddings=64)
    mla = MultiHeadLatentAttention(small, 0)
    assert mla.mla_scale_q_lora == 2.0
    assert mla.mla_scale_kv_lora == pytest.approx(math.sqrt(12))
    assert MultiHeadLatentAttention(make_cfg(), 0).mla_scale_q_lora == 1.0
    with pytest.raises(ValueError, match="mla_scale_q_lora"):
        make_cfg(q_lora_rank=None, mla_scale_q_lora=True)


def test_longcat_scales_change_the_function_and_the_cache():
    cfg = make_cfg()
    plain = randomise(MultiHeadLatentAttention(cfg, 0))
    scaled = MultiHeadLatentAttention(cfg.replace(mla_scale_kv_lora=True), 0)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(1, 5, 64)
    plain_cache, scaled_cache = KVCache(1), KVCache(1)
    out_plain = plain(x, torch.arange(5), plain_cache, mode="absorbed")
    out_scaled = scaled(x, torch.arange(5), scaled_cache, mode="absorbed")
    assert not torch.allclose(out_plain, out_scaled)
    # the cache holds the scaled latent; the rope key is not scaled
    torch.testing.assert_close(scaled_cache.layers[0]["c_kv"],
                               plain_cache.layers[0]["c_kv"] * math.sqrt(64 / 16))
    torch.testing.assert_close(scaled_cache.layers[0]["k_pe"], plain_cache.layers[0]["k_pe"])
