"""moe_align_block_size (minimoe.kernels.moe_align): Triton kernels vs the scheme, on the CPU.

The kernels run through Triton's interpreter (TRITON_INTERPRET set before triton is
imported; see tests/test_kernels_rmsnorm.py). Each case is checked twice: against the
plain-PyTorch loop ``moe_align_block_size_reference`` (the kernels guarantee the same order:
ascending slot ids inside each expert's segment, so the comparison is exact), and against
the scheme's defining properties computed here from topk_idx alone (counts, padding,
segment starts, sentinel, one expert per block).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from minimoe import kernel_switch  # noqa: E402

if not kernel_switch.triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                allow_module_level=True)

from minimoe.kernels.moe_align import (  # noqa: E402
    moe_align_block_size,
    moe_align_block_size_reference,
)


def routing(kind: str, N: int, k: int, E: int, seed: int = 0) -> torch.Tensor:
    """(N, k) expert indices, k distinct per token."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        scores = torch.rand(N, E, generator=gen)
    elif kind == "skewed":  # expert 0 takes almost everything, the last experts nothing
        scores = torch.rand(N, E, generator=gen) * torch.linspace(1.0, 0.0, E).pow(4)
    elif kind == "few":  # only experts 1 and E-2 (and neighbours for k > 2) are ever chosen
        scores = torch.rand(N, E, generator=gen) * 1e-3
        scores[:, 1] += 1.0
        scores[:, E - 2] += 1.0
    else:
        raise ValueError(kind)
    return scores.topk(k, dim=-1).indices  # (N, k)


def check_scheme(topk_idx, num_experts, block_m, sorted_ids, expert_ids, total):
    """The defining properties of the aligned layout, from topk_idx alone."""
    flat = topk_idx.reshape(-1)
    M = flat.numel()
    P = M + num_experts * (block_m - 1)
    assert sorted_ids.shape == (P,) and sorted_ids.dtype == torch.int32
    assert expert_ids.shape == (P // block_m,) and expert_ids.dtype == torch.int32
    assert total.shape == (1,) and total.dtype == torch.int32
    start = 0
    for e in range(num_experts):
        mine = torch.nonzero(flat == e).flatten()  # this expert's slots, ascending
        padded = -(-mine.numel() // block_m) * block_m
        segment = sorted_ids[start:start + padded].long()
        assert torch.equal(segment[:mine.numel()], mine), f"expert {e}"
        assert (segment[mine.numel():] == M).all(), f"expert {e} padding"
        assert (expert_ids[start // block_m:(start + padded) // block_m] == e).all()
        start += padded
    assert int(total) == start
    assert (sorted_ids[start:] == M).all() and (expert_ids[start // block_m:] == -1).all()


CASES = [
    # (N, k, E, block_m, routing)
    (6, 1, 3, 4, "uniform"),  # the docstring's example size
    (7, 2, 4, 16, "uniform"),  # fewer slots than one block
    (33, 3, 8, 16, "uniform"),  # slot counts not multiples of the block
    (33, 1, 8, 16, "skewed"),  # top-1, one dominant expert, empty experts
    (100, 2, 8, 4, "few"),  # only a few experts used
    (200, 2, 16, 16, "skewed"),  # several chunks of 128 slots
    (129, 1, 5, 1, "uniform"),  # block of one row: no padding at all; E not a power of two
    (1, 3, 8, 16, "uniform"),  # a single token
]


@pytest.mark.parametrize("N,k,E,block_m,kind", CASES)
def test_kernel_matches_reference_and_scheme(N, k, E, block_m, kind):
    topk_idx = routing(kind, N, k, E)
    got = moe_align_block_size(topk_idx, E, block_m)
    want = moe_align_block_size_reference(topk_idx, E, block_m)
    check_scheme(topk_idx, E, block_m, *want)  # the reference is the scheme
    for name, a, b in zip(("sorted_token_ids", "expert_ids", "num_tokens_post_padded"), got, want):
        assert torch.equal(a, b), name


def test_docstring_example():
    topk_idx = torch.tensor([2, 0, 2, 2, 0, 2]).view(6, 1)
    sorted_ids, expert_ids, total = moe_align_block_size(topk_idx, 3, 4)
    assert sorted_ids.tolist()[:8] == [1, 4, 6, 6, 0, 2, 3, 5]
    assert expert_ids.tolist()[:2] == [0, 2] and int(total) == 8
    assert (expert_ids[2:] == -1).all() and (sorted_ids[8:] == 6).all()


def test_out_of_range_slots_are_skipped():
    """Indices outside [0, E) (how fused_moe leaves out masked slots) get no row."""
    topk_idx = routing("uniform", 40, 2, 6, seed=3)
    topk_idx[::3, 0] = 6  # "masked" slots
    topk_idx[5, 1] = -1
    topk_idx[7, 1] = 2**32 + 1  # wraps to expert 1 if cast to int32 before the range check
    sorted_ids, expert_ids, total = moe_align_block_size(topk_idx, 6, 8)
    kept = topk_idx.clone()
    kept[(kept < 0) | (kept >= 6)] = 1000  # any index outside [0, E): skipped
    check_scheme(kept, 6, 8, sorted_ids, expert_ids, total)
    for got, want in zip((sorted_ids, expert_ids, total), moe_align_block_size_reference(topk_idx, 6, 8)):
        assert torch.equal(got, want)


def test_no_slots():
    sorted_ids, expert_ids, total = moe_align_block_size(torch.zeros(0, 2, dtype=torch.long), 4, 16)
    assert sorted_ids.shape == (4 * 15,) and (sorted_ids == 0).all()  # sentinel M = 0
    assert expert_ids.shape == (3,) and (expert_ids == -1).all() and int(total) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="topk_idx must be"):
        moe_align_block_size(torch.zeros(5, dtype=torch.long), 4, 16)
    with pytest.raises(ValueError, match="integer"):
        moe_align_block_size(torch.zeros(5, 2), 4, 16)
    with pytest.raises(ValueError, match="block_m"):
        moe_align_block_size(torch.zeros(5, 2, dtype=torch.long), 4, 0)
    with pytest.raises(ValueError, match="num_experts"):
        moe_align_block_size(torch.zeros(5, 2, dtype=torch.long), 0, 16)
