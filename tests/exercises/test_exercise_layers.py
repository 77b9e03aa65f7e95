"""Exercises sorted-dispatch, mla-absorption, yarn: sort-based dispatch, MLA weight absorption, the YaRN ramp and mscale.

References: the dispatch written as a loop over token-slots with the SwiGLU formula; the
'naive' MLA mode (per-head keys and values, no absorption); YaRN's formulas (Peng et al.
2023, Section 3.2 and Eq. 22) written out here.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.experts import RoutedExperts
from minimoe.mla import MultiHeadLatentAttention
from minimoe.moe import dispatch_sorted
from minimoe.rope import RotaryEmbedding, yarn_mscale


def dispatch_by_slot_loop(x, topk_idx, topk_weight, experts, mask=None):
    """sum_j w_tj * W_d (silu(W_g x_t) * W_u x_t), one token-slot at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_idx.shape[1]):
            if mask is not None and not mask[t, j]:
                continue
            e = topk_idx[t, j]
            hidden = F.silu(experts.gate_proj[e] @ x[t]) * (experts.up_proj[e] @ x[t])
            out[t] += topk_weight[t, j] * (experts.down_proj[e] @ hidden)
    return out


@pytest.mark.exercise("sorted-dispatch", points=3)
@pytest.mark.parametrize("hidden,intermediate", [(12, 20), (24, 8)])  # I > C and I < C
@pytest.mark.parametrize("backend", ["loop", None])  # None: grouped_mm where this torch has it
@pytest.mark.parametrize("masked", [False, True])
def test_sorted_dispatch_matches_the_slot_loop(hidden, intermediate, backend, masked):
    generator = torch.Generator().manual_seed(5)
    N, k, E = 9, 3, 5
    experts = RoutedExperts(E, hidden, intermediate, init_std=0.3)  # float32: grouped_mm's dtypes
    x = torch.randn(N, hidden, generator=generator)
    topk_idx = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(N)])
    topk_idx[0] = torch.tensor([4, 3, 2])  # expert 0 and 1 may stay empty elsewhere
    topk_weight = torch.rand(N, k, generator=generator)
    mask = torch.rand(N, k, generator=generator) > 0.3 if masked else None
    with torch.no_grad():
        want = dispatch_by_slot_loop(x.double(), topk_idx, topk_weight.double(), experts.double(), mask)
        experts.float()
        got = dispatch_sorted(x, topk_idx, topk_weight, experts, mask=mask, backend=backend)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.exercise("sorted-dispatch", points=3)
def test_sorted_dispatch_gradients_reach_gate_weights_and_experts():
    generator = torch.Generator().manual_seed(6)
    experts = RoutedExperts(4, 8, 6, init_std=0.3).double()
    x = torch.randn(5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    topk_idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 2], [1, 3]])
    topk_weight = torch.rand(5, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    dispatch_sorted(x, topk_idx, topk_weight, experts, backend="loop").square().sum().backward()
    got = (x.grad, topk_weight.grad, experts.gate_proj.grad)
    for tensor in (x, topk_weight, *experts.parameters()):
        tensor.grad = None
    dispatch_by_slot_loop(x, topk_idx, topk_weight, experts).square().sum().backward()
    for g, w in zip(got, (x.grad, topk_weight.grad, experts.gate_proj.grad)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def mla_config(**overrides):
    values = dict(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                  attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12,
                  qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=0, intermediate_size=64,
                  first_k_dense_replace=0, max_position_embeddings=256)
    values.update(overrides)
    return ModelConfig(**values)


def random_mla(cfg, seed):
    mla = MultiHeadLatentAttention(cfg, layer_index=0).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in mla.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.2)
    return mla


@pytest.mark.exercise("mla-absorption", points=3)
@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"num_attention_heads": 2, "v_head_dim": 20}])
def test_absorbed_prefill_equals_naive(overrides):
    mla = random_mla(mla_config(**overrides), seed=7)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        naive = mla(x, torch.arange(7), mode="naive")
        absorbed = mla(x, torch.arange(7), mode="absorbed")
    torch.testing.assert_close(absorbed, naive, atol=1e-10, rtol=1e-10)


@pytest.mark.exercise("mla-absorption", points=3)
def test_absorbed_decode_with_latent_cache_equals_naive_decode():
    mla = random_mla(mla_config(), seed=9)
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    outputs = {}
    with torch.no_grad():
        for mode in ("naive", "absorbed"):
            cache = KVCache(1)
            steps = [mla(x[:, :5], torch.arange(5), cache, mode=mode)]  # prefill 5
            cache.advance(5)
            for t in range(5, 9):  # then one token at a time
                steps.append(mla(x[:, t:t + 1], torch.arange(t, t + 1), cache, mode=mode))
                cache.advance(1)
            outputs[mode] = torch.cat(steps, dim=1)
        full = mla(x, torch.arange(9), mode="naive")  # no cache at all
    torch.testing.assert_close(outputs["absorbed"], outputs["naive"], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(outputs["absorbed"], full, atol=1e-10, rtol=1e-10)


def yarn_by_formula(rotary_dim, theta, factor, original, beta_fast=32, beta_slow=1):
    """YaRN frequencies: keep f_i for fast pairs, f_i / s for slow ones, a linear ramp between."""
    f = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)

    def pair_turning(rotations):  # the pair index that turns `rotations` times over L
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(beta_fast)), 0)
    high = min(math.ceil(pair_turning(beta_slow)), rotary_dim - 1)
    i = torch.arange(rotary_dim // 2, dtype=torch.float64)
    ramp = ((i - low) / max(high - low, 0.001)).clamp(0, 1)
    return f * (1 - ramp) + f / factor * ramp


@pytest.mark.exercise("yarn", points=2)
@pytest.mark.parametrize("rotary_dim,theta,factor,original", [(64, 10000.0, 40.0, 4096),
                                                               (32, 500000.0, 8.0, 2048),
                                                               (16, 10000.0, 4.0, 64)])
def test_yarn_frequencies_follow_the_ramp(rotary_dim, theta, factor, original):
    rope = RotaryEmbedding(rotary_dim, theta, original * int(factor),
                           {"type": "yarn", "factor": factor, "original_max_position_embeddings": original})
    want = yarn_by_formula(rotary_dim, theta, factor, original)
    torch.testing.assert_close(rope.inv_freq.double(), want, atol=0, rtol=1e-6)
    # the first pairs keep their speed, the last are slowed by exactly the factor
    assert rope.inv_freq[0].item() == pytest.approx(1.0)
    assert rope.inv_freq[-1].item() == pytest.approx(want[-1].item(), rel=1e-6)


@pytest.mark.exercise("yarn", points=2)
def test_yarn_mscale_and_deepseek_attention_factor():
    assert yarn_mscale(1.0) == 1.0
    assert yarn_mscale(40.0) == pytest.approx(0.1 * math.log(40.0) + 1.0)
    assert yarn_mscale(40.0, 0.707) == pytest.approx(0.1 * 0.707 * math.log(40.0) + 1.0)
    # DeepSeek-V3: mscale = mscale_all_dim = 1 -> cos/sin unscaled, softmax scale times mscale^2
    rope = RotaryEmbedding(64, 10000.0, 163840, {"type": "yarn", "factor": 40.0, "mscale": 1.0,
                                                 "mscale_all_dim": 1.0,
                                                 "original_max_position_embeddings": 4096})
    assert rope.cos_sin_scale == pytest.approx(1.0)
    assert rope.attention_scale_multiplier == pytest.approx((0.1 * math.log(40.0) + 1.0) ** 2)
    plain = RotaryEmbedding(64, 10000.0, 32768, {"type": "yarn", "factor": 8.0,
                                                 "original_max_position_embeddings": 4096})
    assert plain.cos_sin_scale == pytest.approx(0.1 * math.log(8.0) + 1.0)
