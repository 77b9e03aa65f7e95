"""Align the routed token-slots to the grouped GEMM's row blocks: ``moe_align_block_size``.

Motivation
----------
``minimoe.moe.dispatch_sorted`` sorts the N*k token-slots by expert so that each expert's
rows are contiguous, then runs one grouped matrix multiply over the blocks. A Triton
grouped GEMM (``minimoe.kernels.fused_moe``) tiles the rows into blocks of BLOCK_M and gives
each program *one* block, so each block must hold rows of one expert only. The trick of
vLLM's and SGLang's ``moe_align_block_size`` is to pad every expert's group of rows up to a
multiple of BLOCK_M; then every block belongs to exactly one expert, and one list
``expert_ids`` (one entry per block) tells each program which weights to load.

The scheme, for M = N*k slots (slot s = token*k + j is token s // k's j-th choice), E
experts and a block of block_m rows:

    count[e]      = #{s : topk_idx.flat[s] == e}                      slots per expert
    padded[e]     = ceil(count[e] / block_m) * block_m                round up to the block
    start[e]      = padded[0] + ... + padded[e-1]                     exclusive prefix sum
    total         = padded[0] + ... + padded[E-1]                     num_tokens_post_padded
    sorted_token_ids[start[e] : start[e] + count[e]] = the slots s of expert e (ascending)
    sorted_token_ids[start[e] + count[e] : start[e] + padded[e]] = M  (a sentinel: "no slot")
    expert_ids[b] = the expert e with start[e] <= b*block_m < start[e] + padded[e]

Only ``total`` depends on the routing; the output *sizes* must not, or the host would have to
wait for the GPU to learn them. Every expert adds at most block_m - 1 padding rows, so

    P = M + E * (block_m - 1)        rows of sorted_token_ids (an upper bound on total)
    P // block_m                     entries of expert_ids

are known from the shapes alone. Entries past ``total`` hold the sentinel M in
sorted_token_ids and -1 in expert_ids; the GEMM programs of those blocks return at once.

An example, E = 3, block_m = 4, k = 1, topk_idx = [2, 0, 2, 2, 0, 2]:
count = [2, 0, 4], padded = [4, 0, 4], start = [0, 4, 4], total = 8,
sorted_token_ids = [1, 4, 6, 6 | 0, 2, 3, 5 | 6 ...] (6 = the sentinel M),
expert_ids = [0, 2, -1, ...]. Expert 1 has no slot and therefore no block.

The kernels (three launches, all on the device, no host synchronisation)
------------------------------------------------------------------------
The M slots are cut into chunks of CHUNK slots, G = ceil(M / CHUNK) chunks.

1. ``_count_kernel`` (G programs): each chunk counts its slots per expert with a
   one-hot comparison (CHUNK x E_PAD) summed over the slots -> ``chunk_counts`` (G, E_PAD).
   No atomics: every program writes its own row.
2. ``_offsets_kernel`` (1 program): walks the G rows of chunk_counts keeping a running
   per-expert total -> ``chunk_offsets[g, e]`` = slots of expert e in chunks before g; then
   pads the totals, takes the exclusive prefix sum (tl.cumsum) -> ``expert_start``,
   ``expert_end``, ``total`` (vLLM's num_tokens_post_padded), and fills ``expert_ids`` block
   by block.
3. ``_scatter_kernel`` (G programs): each slot's position is
   start[e] + chunk_offsets[g, e] + (number of earlier slots of the same expert in the same
   chunk; a CHUNK x CHUNK comparison) and the slot id is written there.

Order guarantee: inside each expert's segment the slots come in ascending slot id (the order
of a *stable* sort by expert, as ``dispatch_sorted``'s argsort), and the result is
deterministic: no atomics anywhere. The tests therefore compare the kernel's output with the
reference exactly, not just as multisets.

Slots whose expert index lies outside [0, num_experts) are skipped: they get no row. The
fused MoE uses this to leave out masked slots (zero-computation experts, dropped slots) by
giving them the index num_experts.

``moe_align_block_size_reference`` below is the same function in plain PyTorch, a loop over
experts, for reading and for the tests.

What the reader should notice
-----------------------------
* The padding is what lets *one* kernel launch serve all experts: a program never straddles
  two experts, so it loads a single expert's weight tile.
* The cost of the padding is at most E * (block_m - 1) wasted rows: small when every expert
  has many tokens (prefill, training), large when they have few (decoding), which is why a
  runtime picks a small block_m for small batches.
* Step 2 is a single program whose loop runs over the G chunks: cheap for the sizes of one
  MoE layer (G = M / 128), and the only serial part.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 128  # slots per program in the count and scatter kernels
BLOCK_B = 128  # expert_ids entries written per step of the offsets kernel


# ----------------------------------------------------------------------------------------------
# The readable reference
# ----------------------------------------------------------------------------------------------
def moe_align_block_size_reference(topk_idx: torch.Tensor, num_experts: int, block_m: int):
    """Plain PyTorch ``moe_align_block_size``: a loop over experts (see the module docstring).

    topk_idx (N, k) integer expert index per slot; slots with an index outside
    [0, num_experts) are skipped. Returns sorted_token_ids (P,) int32, expert_ids
    (P // block_m,) int32 and num_tokens_post_padded (1,) int32, P = N*k + E*(block_m - 1).
    """
    _check_align_arguments(topk_idx, num_experts, block_m)
    expert_of_slot = topk_idx.reshape(-1)  # (M,)
    num_slots = expert_of_slot.numel()  # M = N * k
    size = num_slots + num_experts * (block_m - 1)  # P: the worst-case padded length
    device = topk_idx.device
    sorted_token_ids = torch.full((size,), num_slots, dtype=torch.int32, device=device)  # (P,)
    expert_ids = torch.full((size // block_m,), -1, dtype=torch.int32, device=device)  # (P//bm,)
    start = 0  # first row of expert e's segment
    for e in range(num_experts):
        slots = torch.nonzero(expert_of_slot == e).flatten()  # (count_e,) ascending slot ids
        count = slots.numel()
        padded = -(-count // block_m) * block_m  # ceil(count / block_m) * block_m
        sorted_token_ids[start:start + count] = slots.to(torch.int32)
        expert_ids[start // block_m:(start + padded) // block_m] = e
        start += padded
    total = torch.tensor([start], dtype=torch.int32, device=device)  # (1,)
    return sorted_token_ids, expert_ids, total


def _check_align_arguments(topk_idx: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be (N, k), got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype.is_floating_point or topk_idx.dtype == torch.bool:
        raise ValueError(f"topk_idx must hold integer expert indices, got {topk_idx.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")


# ----------------------------------------------------------------------------------------------
# The Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _count_kernel(
    EXPERT_ptr,
    CHUNK_COUNTS_ptr,
    num_slots,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Slots per expert in one chunk of CHUNK slots.

    EXPERT_ptr:       (num_slots,) integer expert index of each slot (topk_idx flattened)
    CHUNK_COUNTS_ptr: (chunks, E_PAD) int32 output: row g = slots of each expert in chunk g
    num_slots:        M = N * k
    CHUNK:            constexpr, slots per program
    E_PAD:            constexpr, next power of two >= num_experts (columns of the counts)
    """
    # 1. this chunk's slots and their experts; -1 past the end and outside [0, E_PAD), decided
    #    before the int32 cast (which would wrap an int64 index >= 2**31 onto a real expert)
    chunk = tl.program_id(0)
    slots = chunk * CHUNK + tl.arange(0, CHUNK)
    index = tl.load(EXPERT_ptr + slots, mask=slots < num_slots, other=-1)  # read CHUNK
    inside = (slots < num_slots) & (index >= 0) & (index < E_PAD)
    expert = tl.where(inside, index, -1).to(tl.int32)  # -1 matches no column

    # 2. one-hot (CHUNK, E_PAD) summed over the slots: the chunk's histogram
    columns = tl.arange(0, E_PAD)
    hits = (expert[:, None] == columns[None, :]).to(tl.int32)  # (CHUNK, E_PAD)
    counts = tl.sum(hits, axis=0)  # (E_PAD,)
    tl.store(CHUNK_COUNTS_ptr + chunk * E_PAD + columns, counts)  # write E_PAD


@triton.jit
def _offsets_kernel(
    CHUNK_COUNTS_ptr,
    CHUNK_OFFSETS_ptr,
    EXPERT_START_ptr,
    EXPERT_END_ptr,
    EXPERT_IDS_ptr,
    NUM_POST_PAD_ptr,
    num_chunks,
    num_experts,
    block_m,
    num_blocks,
    E_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program: per-chunk offsets, padded expert segments, expert id of every block.

    CHUNK_COUNTS_ptr:  (chunks, E_PAD) int32, from _count_kernel
    CHUNK_OFFSETS_ptr: (chunks, E_PAD) int32 output: slots of expert e in the chunks before g
    EXPERT_START_ptr:  (num_experts,) int32 output: first row of expert e's padded segment
    EXPERT_END_ptr:    (num_experts,) int32 output: start + padded count
    EXPERT_IDS_ptr:    (num_blocks,) int32 output: expert of each block of block_m rows, -1 past the total
    NUM_POST_PAD_ptr:  (1,) int32 output: total padded rows
    num_chunks:        G = ceil(M / CHUNK)
    num_experts:       E
    block_m:           rows per block of the grouped GEMM
    num_blocks:        P // block_m
    E_PAD:             constexpr, next power of two >= E
    BLOCK_B:           constexpr, expert_ids entries written per step
    """
    # 1. running per-expert totals over the chunks: the exclusive prefix sum along chunks
    columns = tl.arange(0, E_PAD)
    is_expert = columns < num_experts
    running = tl.zeros((E_PAD,), dtype=tl.int32)
    for chunk in range(num_chunks):
        counts = tl.load(CHUNK_COUNTS_ptr + chunk * E_PAD + columns)  # read E_PAD
        tl.store(CHUNK_OFFSETS_ptr + chunk * E_PAD + columns, running)  # write E_PAD
        running += counts

    # 2. pad each expert's count to a multiple of block_m; exclusive prefix sum over experts
    counts = tl.where(is_expert, running, 0)  # columns past E hold skipped slots: drop them
    padded = (counts + block_m - 1) // block_m * block_m  # (E_PAD,)
    end = tl.cumsum(padded, axis=0)  # (E_PAD,) inclusive prefix sum
    start = end - padded
    total = tl.sum(padded, axis=0)
    tl.store(EXPERT_START_ptr + columns, start, mask=is_expert)
    tl.store(EXPERT_END_ptr + columns, end, mask=is_expert)
    tl.store(NUM_POST_PAD_ptr, total)

    # 3. block b starts at row b*block_m; its expert = the number of segments ending at or
    #    before that row (empty segments end where they start and are counted, i.e. skipped)
    for first in range(0, num_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        row = blocks * block_m  # (BLOCK_B,)
        ended = (end[None, :] <= row[:, None]) & is_expert[None, :]  # (BLOCK_B, E_PAD)
        expert = tl.sum(ended.to(tl.int32), axis=1)  # (BLOCK_B,)
        expert = tl.where(row < total, expert, -1)
        tl.store(EXPERT_IDS_ptr + blocks, expert, mask=blocks < num_blocks)  # write BLOCK_B


@triton.jit
def _scatter_kernel(
    EXPERT_ptr,
    CHUNK_OFFSETS_ptr,
    EXPERT_START_ptr,
    SORTED_IDS_ptr,
    num_slots,
    num_experts,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Write each slot id of one chunk at its row of the sorted, padded layout.

    EXPERT_ptr:        (num_slots,) integer expert index of each slot
    CHUNK_OFFSETS_ptr: (chunks, E_PAD) int32, from _offsets_kernel
    EXPERT_START_ptr:  (num_experts,) int32, from _offsets_kernel
    SORTED_IDS_ptr:    (P,) int32 output, pre-filled with the sentinel num_slots
    num_slots:         M = N * k
    num_experts:       E (slots with an expert outside [0, E) are skipped)
    CHUNK:             constexpr, slots per program
    E_PAD:             constexpr, row stride of CHUNK_OFFSETS
    """
    # 1. this chunk's slots and their experts
    chunk = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    slots = chunk * CHUNK + local
    index = tl.load(EXPERT_ptr + slots, mask=slots < num_slots, other=-1)  # read CHUNK
    valid = (slots < num_slots) & (index >= 0) & (index < num_experts)  # before the int32 cast
    expert = tl.where(valid, index, -1).to(tl.int32)

    # 2. rank inside the chunk: earlier slots of the same chunk with the same expert
    same = (expert[:, None] == expert[None, :]) & (local[None, :] < local[:, None])  # (CHUNK, CHUNK)
    rank = tl.sum(same.to(tl.int32), axis=1)  # (CHUNK,)

    # 3. row = start of the expert's segment + its slots in earlier chunks + rank
    safe = tl.where(valid, expert, 0)
    start = tl.load(EXPERT_START_ptr + safe, mask=valid, other=0)  # read CHUNK (cached)
    before = tl.load(CHUNK_OFFSETS_ptr + chunk * E_PAD + safe, mask=valid, other=0)  # read CHUNK
    tl.store(SORTED_IDS_ptr + start + before + rank, slots, mask=valid)  # write CHUNK


# True when this module was imported with TRITON_INTERPRET=1 (minimoe.kernel_switch checks it).
INTERPRETED = not isinstance(_count_kernel, triton.runtime.JITFunction)


def align_with_segments(expert_of_slot: torch.Tensor, num_experts: int, block_m: int):
    """``moe_align_block_size`` plus each expert's segment: the grouped GEMMs' inputs.

    expert_of_slot (M,) integer. Returns sorted_token_ids (P,), expert_ids (P // block_m,),
    num_tokens_post_padded (1,), expert_start (E,), expert_end (E,), all int32 on the device
    of expert_of_slot. No host synchronisation: every size comes from the shapes.
    """
    expert_of_slot = expert_of_slot.contiguous()
    device = expert_of_slot.device
    num_slots = expert_of_slot.numel()
    size = num_slots + num_experts * (block_m - 1)  # P
    num_blocks = size // block_m
    num_chunks = triton.cdiv(num_slots, CHUNK)
    e_pad = max(triton.next_power_of_2(num_experts), 2)

    sorted_token_ids = torch.full((size,), num_slots, dtype=torch.int32, device=device)  # (P,)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)  # (P // bm,)
    total = torch.empty(1, dtype=torch.int32, device=device)  # (1,)
    expert_start = torch.empty(num_experts, dtype=torch.int32, device=device)  # (E,)
    expert_end = torch.empty(num_experts, dtype=torch.int32, device=device)  # (E,)
    chunk_counts = torch.empty((max(num_chunks, 1), e_pad), dtype=torch.int32, device=device)
    chunk_offsets = torch.empty_like(chunk_counts)  # (G, E_PAD)

    if num_chunks > 0:
        _count_kernel[(num_chunks,)](expert_of_slot, chunk_counts, num_slots,
                                     CHUNK=CHUNK, E_PAD=e_pad, num_warps=4)
    _offsets_kernel[(1,)](chunk_counts, chunk_offsets, expert_start, expert_end, expert_ids,
                          total, num_chunks, num_experts, block_m, num_blocks,
                          E_PAD=e_pad, BLOCK_B=BLOCK_B, num_warps=4)
    if num_chunks > 0:
        _scatter_kernel[(num_chunks,)](expert_of_slot, chunk_offsets, expert_start,
                                       sorted_token_ids, num_slots, num_experts,
                                       CHUNK=CHUNK, E_PAD=e_pad, num_warps=8)
    return sorted_token_ids, expert_ids, total, expert_start, expert_end


def moe_align_block_size(topk_idx: torch.Tensor, num_experts: int, block_m: int):
    """Group the N*k slots by expert, each group padded to a multiple of block_m (Triton).

    topk_idx: (N, k) integer expert index per slot, on CUDA (or the CPU under
    TRITON_INTERPRET=1); slots with an index outside [0, num_experts) are skipped.
    Returns, with M = N*k and P = M + num_experts * (block_m - 1):
      sorted_token_ids        (P,) int32   slot ids (token*k + j) grouped by expert, each
                                           group ascending and padded with the sentinel M
      expert_ids              (P // block_m,) int32   expert of each block of block_m rows,
                                           -1 for blocks past num_tokens_post_padded
      num_tokens_post_padded  (1,) int32   rows actually used (a multiple of block_m)
    Same result as ``moe_align_block_size_reference``; runs without host synchronisation.
    """
    _check_align_arguments(topk_idx, num_experts, block_m)
    sorted_token_ids, expert_ids, total, _, _ = align_with_segments(
        topk_idx.reshape(-1), num_experts, block_m)
    return sorted_token_ids, expert_ids, total
