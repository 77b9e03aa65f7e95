"""RMSNorm and RoPE (default, partial, interleaved, linear, NTK, dynamic NTK, YaRN) against
hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.norm import RMSNorm
from minimoe.rope import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_interleaved,
    interleaved_to_half_permutation,
    rotate_half,
)

V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def rope_by_hand(x, positions, inv_freq):
    """Rotate pairs (x[i], x[i + r/2]) of the first r = 2*len(inv_freq) dims, one at a time."""
    out = x.double().clone()
    half = len(inv_freq)
    for t, position in enumerate(positions):
        for i in range(half):
            angle = float(position) * float(inv_freq[i])
            a, b = x[..., t, i].double(), x[..., t, i + half].double()
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def hand_inv_freq(rotary_dim, theta):
    return [theta ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)]


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(12, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12))
    x = torch.randn(3, 5, 12)
    x64 = x.double()
    expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-6, rtol=1e-6)
    assert norm.weight.shape == (12,)
    assert torch.equal(RMSNorm(7).weight, torch.ones(7))


def test_rmsnorm_keeps_bf16_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(64)
    x = (torch.randn(2, 4, 64) * 30).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x64 = x.double()
    expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.double(), expected, atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------


def test_rope_matches_hand_rotation():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, theta=10000.0, max_position_embeddings=128)
    positions = torch.tensor([0, 1, 5, 17])
    x = torch.randn(2, 3, 4, 8)
    cos, sin = rope(positions)
    assert cos.shape == (4, 8) and sin.dtype == torch.float32
    expected = rope_by_hand(x, positions.tolist(), hand_inv_freq(8, 10000.0))
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), expected, atol=1e-5, rtol=1e-5)


def test_rotate_half():
    x = torch.arange(6.0)
    assert rotate_half(x).tolist() == [-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(0, 500))
def test_rope_scores_depend_only_on_distance(m, n, shift):
    generator = torch.Generator().manual_seed(m * 1000 + n)
    q = torch.randn(1, 1, 1, 16, generator=generator, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=generator, dtype=torch.float64)
    rope = RotaryEmbedding(16, theta=10000.0, max_position_embeddings=2048)

    def score(pq, pk):
        cos_q, sin_q = rope(torch.tensor([pq]))
        cos_k, sin_k = rope(torch.tensor([pk]))
        return (apply_rotary(q, cos_q.double(), sin_q.double())
                * apply_rotary(k, cos_k.double(), sin_k.double())).sum().item()

    # float32 angles up to ~1000 rad carry ~1e-4 absolute error
    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=2e-3)


def test_partial_rotary_passes_the_rest_through_unchanged():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, theta=10000.0, max_position_embeddings=64)
    x = torch.randn(2, 3, 5, 24)
    cos, sin = rope(torch.arange(5))
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[..., :8], apply_rotary(x[..., :8].contiguous(), cos, sin))
    assert not torch.allclose(y[..., :8], x[..., :8])
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(x[..., :6], cos, sin)


def test_interleaved_layout_matches_hand_rotation_of_adjacent_pairs():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, theta=500.0, max_position_embeddings=64)
    positions = [0, 3, 9]
    x = torch.randn(1, 2, 3, 10)
    cos, sin = rope(torch.tensor(positions))
    y = apply_rotary_interleaved(x, cos, sin)
    freqs = hand_inv_freq(8, 500.0)
    expected = x.double().clone()
    for t, p in enumerate(positions):
        for i, f in enumerate(freqs):
            a, b = x[..., t, 2 * i].double(), x[..., t, 2 * i + 1].double()
            expected[..., t, 2 * i] = a * math.cos(p * f) - b * math.sin(p * f)
            expected[..., t, 2 * i + 1] = a * math.sin(p * f) + b * math.cos(p * f)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[..., 8:], x[..., 8:])


def test_interleaved_and_half_layouts_agree_up_to_the_permutation():
    torch.manual_seed(0)
    rotary_dim, hidden = 8, 12
    perm = interleaved_to_half_permutation(rotary_dim)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    rope = RotaryEmbedding(rotary_dim, theta=10000.0, max_position_embeddings=64)
    positions = torch.arange(6)
    cos, sin = rope(positions)

    # vectors: permuting then rotating (half) == rotating (interleaved) then permuting
    x = torch.randn(2, 3, 6, rotary_dim)
    torch.testing.assert_close(apply_rotary(x[..., perm], cos, sin),
                               apply_rotary_interleaved(x, cos, sin)[..., perm])

    # weights: a projection trained for the interleaved layout, rows permuted, gives the
    # same attention scores under the rotate-half layout
    w_q, w_k = torch.randn(rotary_dim, hidden), torch.randn(rotary_dim, hidden)
    h = torch.randn(1, 1, 6, hidden)
    q_inter = apply_rotary_interleaved(h @ w_q.T, cos, sin)
    k_inter = apply_rotary_interleaved(h @ w_k.T, cos, sin)
    q_half = apply_rotary(h @ w_q[perm].T, cos, sin)
    k_half = apply_rotary(h @ w_k[perm].T, cos, sin)
    torch.testing.assert_close(q_half @ k_half.transpose(-1, -2), q_inter @ k_inter.transpose(-1, -2),
                               atol=1e-4, rtol=1e-5)


def test_default_scaling_dicts_equal_none():
    positions = torch.arange(10)
    reference = RotaryEmbedding(8, 10000.0, 64)(positions)
    for scaling in ({"type": "default"}, {"rope_type": "default"}):
        rope = RotaryEmbedding(8, 10000.0, 64, scaling)
        assert rope.attention_scale_multiplier == 1.0
        for got, want in zip(rope(positions), reference):
            assert torch.equal(got, want)


def test_linear_scaling_is_default_rope_at_positions_over_factor():
    positions = torch.arange(0, 40, 3)
    linear = RotaryEmbedding(8, 10000.0, 64, {"type": "linear", "factor": 4.0})
    cos, sin = linear(positions)
    freqs = hand_inv_freq(8, 10000.0)
    for t, p in enumerate(positions.tolist()):
        for i, f in enumerate(freqs):
            angle = p / 4.0 * f
            assert cos[t, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[t, i + 4].item() == pytest.approx(math.sin(angle), abs=1e-6)
    default_cos, default_sin = RotaryEmbedding(8, 10000.0, 64)(positions.float() / 4.0)
    torch.testing.assert_close(cos, default_cos)
    torch.testing.assert_close(sin, default_sin)
    assert linear.attention_scale_multiplier == 1.0


def test_yarn_deepseek_v3_numbers():
    rope = RotaryEmbedding(64, theta=10000.0, max_position_embeddings=163840, rope_scaling=V3_YARN)
    # correction range: raw 10.47 and 22.51 -> floor / ceil
    corr = lambda r: 64 * math.log(4096 / (2 * math.pi * r)) / (2 * math.log(10000))  # noqa: E731
    assert corr(32) == pytest.approx(10.47, abs=5e-3) and corr(1) == pytest.approx(22.51, abs=5e-3)
    assert (rope.yarn_low, rope.yarn_high) == (10, 23)
    # temperature: mscale = 0.1 ln 40 + 1, in the softmax scale (DeepSeek convention)
    assert 0.1 * math.log(40) + 1 == pytest.approx(1.368888, abs=1e-6)
    assert rope.attention_scale_multiplier == pytest.approx(1.368888**2, rel=1e-6)
    assert 192**-0.5 * rope.attention_scale_multiplier == pytest.approx(0.135234, abs=1e-6)
    assert rope.cos_sin_scale == 1.0  # mscale / mscale_all_dim = 1
    # frequencies: ramp from the REFERENCE formula
    expected = []
    for i, f in enumerate(hand_inv_freq(64, 10000.0)):
        ramp = min(max((i - 10) / (23 - 10), 0.0), 1.0)
        expected.append(f / 40 * ramp + f * (1 - ramp))
    got = rope.inv_freq.double()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    base = torch.tensor(hand_inv_freq(64, 10000.0), dtype=torch.float64)
    torch.testing.assert_close(got[:11], base[:11], rtol=1e-6, atol=0)  # extrapolated
    torch.testing.assert_close(got[23:], base[23:] / 40, rtol=1e-6, atol=0)  # interpolated
    assert ((got[11:23] < base[11:23]) & (got[11:23] > base[11:23] / 40)).all()


def test_yarn_temperature_conventions():
    s = 8.0
    # Hugging Face default (no mscale keys): cos/sin carry 0.1 ln s + 1, softmax untouched
    hf = RotaryEmbedding(16, 10000.0, 32768, {"rope_type": "yarn", "factor": s,
                                              "original_max_position_embeddings": 4096})
    assert hf.cos_sin_scale == pytest.approx(0.1 * math.log(s) + 1)
    assert hf.attention_scale_multiplier == 1.0
    cos, sin = hf(torch.tensor([0]))
    assert cos[0, 0].item() == pytest.approx(0.1 * math.log(s) + 1, rel=1e-6)
    # explicit attention_factor wins for cos/sin
    explicit = RotaryEmbedding(16, 10000.0, 32768, {"type": "yarn", "factor": s,
                                                    "attention_factor": 1.5})
    assert explicit.cos_sin_scale == 1.5 and explicit.attention_scale_multiplier == 1.0
    # DeepSeek-V2-Lite style: mscale = mscale_all_dim = 0.707
    lite = RotaryEmbedding(16, 10000.0, 163840, {"type": "yarn", "factor": 40, "mscale": 0.707,
                                                 "mscale_all_dim": 0.707,
                                                 "original_max_position_embeddings": 4096})
    assert lite.cos_sin_scale == pytest.approx(1.0)
    assert lite.attention_scale_multiplier == pytest.approx((0.0707 * math.log(40) + 1) ** 2)
    # different mscale and mscale_all_dim: the ratio goes to cos/sin
    mixed = RotaryEmbedding(16, 10000.0, 163840, {"type": "yarn", "factor": 40, "mscale": 1.0,
                                                  "mscale_all_dim": 0.5})
    assert mixed.cos_sin_scale == pytest.approx((0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1))
    assert mixed.attention_scale_multiplier == pytest.approx((0.05 * math.log(40) + 1) ** 2)


def test_yarn_deepseek_v3_frequencies_at_chosen_indices():
    """f_i = 10000^(-i/32) for rotary_dim 64; the ramp is (i - 10) / 13 between 10 and 23."""
    rope = RotaryEmbedding(64, theta=10000.0, max_position_embeddings=163840, rope_scaling=V3_YARN)
    got = rope.inv_freq.double()
    assert got[0].item() == pytest.approx(1.0, rel=1e-7)  # turns once per token, kept
    assert got[10].item() == pytest.approx(10**-1.25, rel=1e-6)  # ramp 0: kept
    # i = 16: f = 10000^(-1/2) = 0.01, ramp 6/13: 0.01 * (6/13) / 40 + 0.01 * (7/13) = 0.0055
    assert got[16].item() == pytest.approx(0.0055, rel=1e-6)
    assert got[23].item() == pytest.approx(10**-2.875 / 40, rel=1e-6)  # ramp 1: divided by 40
    assert got[31].item() == pytest.approx(10**-3.875 / 40, rel=1e-6)
    # the wavelength of pair 23 before scaling is 2 pi / f = 4712 > 4096 tokens: it never
    # completed one turn in the original context, which is why it is interpolated
    assert 2 * math.pi / 10**-2.875 == pytest.approx(4711.7, abs=0.1)


def test_ntk_matches_its_formula():
    d, theta, s = 16, 10000.0, 4.0
    rope = RotaryEmbedding(d, theta, 64, {"type": "ntk", "factor": s})
    new_base = theta * s ** (d / (d - 2))
    expected = [new_base ** (-2 * i / d) for i in range(d // 2)]
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    base = hand_inv_freq(d, theta)
    # pair 0 untouched, the last pair divided by exactly s, pair i by s^(2i / (d - 2))
    assert rope.inv_freq[0].item() == 1.0
    assert rope.inv_freq[-1].item() == pytest.approx(base[-1] / s, rel=1e-6)
    for i in range(d // 2):
        assert rope.inv_freq[i].item() == pytest.approx(base[i] / s ** (2 * i / (d - 2)), rel=1e-6)
    assert rope.cos_sin_scale == 1.0 and rope.attention_scale_multiplier == 1.0


def test_dynamic_ntk_changes_only_beyond_the_original_length():
    d, theta, factor, original = 8, 10000.0, 4.0, 32
    rope = RotaryEmbedding(d, theta, 1024, {"rope_type": "dynamic", "factor": factor,
                                            "original_max_position_embeddings": original})
    default = RotaryEmbedding(d, theta, 1024)
    short = torch.arange(original)
    for got, want in zip(rope(short), default(short)):
        assert torch.equal(got, want)
    long = torch.arange(80)  # T = 80 > 32: s(T) = 4 * 80 / 32 - 3 = 7
    s = factor * 80 / original - (factor - 1)
    assert s == 7.0
    ntk = RotaryEmbedding(d, theta, 1024, {"type": "ntk", "factor": s})
    for got, want in zip(rope(long), ntk(long)):
        torch.testing.assert_close(got, want)
    # the same position gets different angles depending on how long the sequence is
    assert not torch.allclose(rope(torch.arange(40))[0][39], rope(torch.arange(80))[0][39])


def test_unknown_scaling_raises():
    with pytest.raises(NotImplementedError, match="longrope"):
        RotaryEmbedding(8, 10000.0, 64, {"type": "longrope", "factor": 2.0})


def test_bad_rotary_dim():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 10000.0, 64)
    with pytest.raises(ValueError, match="even"):
        interleaved_to_half_permutation(5)


def test_permute_rotary_rows_mla_style_heads():
    """Two heads of [nope 2 | rope 4]: only the rope rows of each head are reordered, and
    interleaved scores equal rotate-half scores after the permutation."""
    from minimoe.rope import permute_rotary_rows

    torch.manual_seed(0)
    heads, nope, rope_dim, hidden = 2, 2, 4, 5
    head_dim = nope + rope_dim
    w = torch.randn(heads * head_dim, hidden)
    permuted = permute_rotary_rows(w, head_dim, rope_dim, rotary_offset=nope)
    # by hand: head h rows [0, 1 | 2, 4, 3, 5] (perm [0, 2, 1, 3] on the rope part)
    expected_rows = [0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11]
    assert torch.equal(permuted, w[expected_rows])
    bias = torch.arange(12.0)
    assert permute_rotary_rows(bias, head_dim, rope_dim, nope).tolist() == [float(r) for r in expected_rows]
    rope = RotaryEmbedding(rope_dim, theta=100.0, max_position_embeddings=16)
    cos, sin = rope(torch.arange(3))
    h = torch.randn(1, 1, 3, hidden)
    for head in range(heads):
        rows = slice(head * head_dim + nope, (head + 1) * head_dim)
        q_inter = apply_rotary_interleaved(h @ w[rows].T, cos, sin)
        q_half = apply_rotary(h @ permuted[rows].T, cos, sin)
        torch.testing.assert_close(q_half @ q_half.transpose(-1, -2), q_inter @ q_inter.transpose(-1, -2),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fit"):
        permute_rotary_rows(w, head_dim, rope_dim, rotary_offset=3)
