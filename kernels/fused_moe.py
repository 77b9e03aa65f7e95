"""Fused MoE experts in Triton: grouped GEMMs over the aligned slots, forward and backward.

Motivation
----------
``minimoe.moe.dispatch_sorted`` computes the routed experts in five steps, each a pass over
memory: gather the slots' token rows (M x C written), the gate and the up products (2 M x I),
SwiGLU (M x I), the down product (M x C), the weighted scatter-add (M x C). The grouped
GEMMs dominate the FLOPs, but the gather and the elementwise steps are pure traffic. Here
the same function is three kernels plus a sum (M = N*k slots, P = the padded rows):

    1. _gate_up_kernel  h = silu(x[t] W_g[e]^T) * (x[t] W_u[e]^T)    the gather is in the load,
                                                                      SwiGLU in the epilogue
    2. _down_kernel     y_slot = w_slot * (h W_d[e]^T)                the routing weight in
                                                                      the epilogue, stored at
                                                                      the slot's row
    3. combine          out[t] = sum_j y_slot[t*k + j]                (N, k, C) -> (N, C) in float32

Each program owns one block of BLOCK_M rows of the *aligned* layout of
``minimoe.kernels.moe_align`` (every block holds rows of one expert, padded with a sentinel)
and one tile of output columns; it loads its expert's weight tile once per K step.
The token rows are never copied into a sorted buffer: the kernel reads ``x`` through
``sorted_token_ids`` (row = slot // k), the scheme of vLLM's and SGLang's fused_moe.

The combine needs no atomics: every slot owns one row of a (N*k, C) buffer, the down kernel
stores its result there (no two programs write the same row), and the k rows of a token are
summed by ``view(N, k, C).sum(1)`` in float32. Masked slots keep their zero row.

Backward, with dOut (N, C) the incoming gradient, dY_slot = dOut[t] (gathered, never copied),
g = x W_g^T, u = x W_u^T, h = silu(g) * u, s = sigmoid(g):

    4. _down_backward_kernel   a = dOut[t] W_d[e]                    (BLOCK_M, I tile)
                               d w_slot = sum_i a_i h_i              (partial per I tile)
                               dh = w_slot * a
                               dg = dh * u * s * (1 + g (1 - s))     silu'(g) = s (1 + g (1 - s))
                               du = dh * silu(g)
    5. _gate_up_backward_kernel dx_slot = dg W_g[e] + du W_u[e]      stored at the slot's row,
                                                                      summed over k like step 3
    6. _expert_weight_grad_kernel, one program per (expert, output tile), looping over the
       expert's rows:
                               dW_g[e] = dg_e^T x_e      dW_u[e] = du_e^T x_e
                               dW_d[e] = (w * dOut[t])_e^T h_e

The forward saves g and u (P x I each, in x's dtype) and h for the backward, as autograd
does for the reference.

Precision: every product accumulates in float32 (``tl.dot`` with a float32 accumulator);
operands are loaded in x's dtype. Float32 operands multiply in IEEE float32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as torch would). The per-slot
results and the combine are float32, and the output dtype is
promote(x.dtype, topk_weight.dtype), as ``dispatch_sorted`` returns.

Block sizes: BLOCK_M is also the alignment of ``moe_align_block_size`` (16 in the
interpreter; on a GPU 16, 32 or 64 by the average rows per expert, since each expert
wastes up to BLOCK_M - 1 padded rows). Column tiles of 64 (inner steps of 32 for float32
operands on a GPU). One fixed configuration per problem: no autotuning yet, because the
alignment depends on BLOCK_M and the other sizes have not been measured on a GPU. (No kernel
here uses atomics and every store is idempotent, so autotuning's repeated launches would be
safe.) The interpreter uses tiles of 64 along C and I too: it pays per program, not per
element.

Where the time should go on a GPU: the grouped GEMMs, three forward (gate, up, down) and
six backward (dh; dx from dg and du; dW_g, dW_u, dW_d), 2 M C I flops each with M the used
rows including padding, and the weight-gradient kernel's serial walk over each expert's
rows, which makes one expert with many rows the critical path under skewed routing.

What the reader should notice
-----------------------------
* No (M, C) copy of the tokens exists: the "dispatch" is an index in the x load, and the
  "combine" is one float32 store per slot plus a sum over k.
* The routing weight is linear, so it can sit in any epilogue; here it sits in the down
  projection's, and its gradient is d w = <dOut[t], h W_d^T> = sum_i h_i (dOut[t] W_d)_i,
  a by-product of the dh product that the backward computes anyway.
* Padding rows carry the sentinel slot: their loads are masked to zero, so they add zero to
  every product and are never stored to a slot.

Running it without a GPU: set ``TRITON_INTERPRET=1`` before triton is first imported; test
with float32 or float16 there (the interpreter's bfloat16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from minimoe.kernels.moe_align import align_with_segments

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # x and the weights: tl.dot operands


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gate_up_kernel(
    X_ptr,
    WG_ptr,
    WU_ptr,
    H_ptr,
    G_ptr,
    U_ptr,
    SORTED_IDS_ptr,
    EXPERT_IDS_ptr,
    NUM_POST_PAD_ptr,
    num_slots,
    top_k,
    C,
    I,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """h = silu(x W_g[e]^T) * (x W_u[e]^T) for one block of aligned rows and one I tile.

    X_ptr:            (N, C) token activations, contiguous
    WG_ptr, WU_ptr:   (E, I, C) gate and up weights (nn.Linear layout), x's dtype
    H_ptr:            (P, I) output, x's dtype: the hidden activation of each aligned row
    G_ptr, U_ptr:     (P, I) outputs, x's dtype: gate and up pre-activations (if SAVE_PREACT)
    SORTED_IDS_ptr:   (P,) int32 slot of each aligned row, num_slots = padding
    EXPERT_IDS_ptr:   (P // BLOCK_M,) int32 expert of each block
    NUM_POST_PAD_ptr: (1,) int32 rows in use
    num_slots:        M = N * k (the sentinel)
    top_k:            k; the token of slot s is s // k
    C, I:             hidden and expert widths
    BLOCK_M:          constexpr, rows per block (= the alignment)
    BLOCK_N:          constexpr, I columns per program
    BLOCK_K:          constexpr, C columns per inner step
    SAVE_PREACT:      constexpr, also store g and u for the backward
    DOT_PRECISION:    constexpr, tl.dot input precision ("ieee" or "tf32")
    """
    # 1. which block, which expert; blocks past the used rows have nothing to do
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NUM_POST_PAD_ptr):
        return
    expert = tl.load(EXPERT_IDS_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # aligned rows
    slot = tl.load(SORTED_IDS_ptr + rows)  # read BLOCK_M
    real = slot < num_slots  # padding rows are masked to zero
    token = tl.where(real, slot // top_k, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I

    # 2. two accumulators over C: the gather of token rows happens in the x load
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = expert * I * C
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        x = tl.load(X_ptr + token[:, None] * C + ks[None, :],
                    mask=real[:, None] & k_ok[None, :], other=0.0)  # read BLOCK_M x BLOCK_K
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_offsets = w_base + cols[None, :] * C + ks[:, None]  # (BLOCK_K, BLOCK_N) = W[e]^T tile
        w_gate = tl.load(WG_ptr + w_offsets, mask=w_mask, other=0.0)  # read BLOCK_K x BLOCK_N
        w_up = tl.load(WU_ptr + w_offsets, mask=w_mask, other=0.0)  # read BLOCK_K x BLOCK_N
        acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)

    # 3. SwiGLU epilogue in float32, one store of h (and of g, u for the backward)
    hidden = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_offsets = rows[:, None].to(tl.int64) * I + cols[None, :]
    tl.store(H_ptr + out_offsets, hidden.to(H_ptr.dtype.element_ty), mask=col_ok[None, :])  # write BLOCK_M x BLOCK_N
    if SAVE_PREACT:
        tl.store(G_ptr + out_offsets, acc_gate.to(G_ptr.dtype.element_ty), mask=col_ok[None, :])
        tl.store(U_ptr + out_offsets, acc_up.to(U_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _down_kernel(
    H_ptr,
    WD_ptr,
    WEIGHT_ptr,
    Y_SLOT_ptr,
    SORTED_IDS_ptr,
    EXPERT_IDS_ptr,
    NUM_POST_PAD_ptr,
    num_slots,
    C,
    I,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y_slot = w_slot * (h W_d[e]^T) for one block of aligned rows and one C tile.

    H_ptr:            (P, I) hidden activations from _gate_up_kernel
    WD_ptr:           (E, C, I) down weights (nn.Linear layout), h's dtype
    WEIGHT_ptr:       (num_slots,) routing weight of each slot (topk_weight flattened)
    Y_SLOT_ptr:       (num_slots, C) float32 output: each slot's weighted expert output, at
                      the slot's own row (rows of masked slots are left untouched)
    SORTED_IDS_ptr, EXPERT_IDS_ptr, NUM_POST_PAD_ptr, num_slots: as in _gate_up_kernel
    C, I:             hidden and expert widths
    BLOCK_M:          constexpr, rows per block (= the alignment)
    BLOCK_N:          constexpr, C columns per program
    BLOCK_K:          constexpr, I columns per inner step
    DOT_PRECISION:    constexpr, tl.dot input precision
    """
    # 1. block, expert, slots
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NUM_POST_PAD_ptr):
        return
    expert = tl.load(EXPERT_IDS_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(SORTED_IDS_ptr + rows)  # read BLOCK_M
    real = slot < num_slots
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C

    # 2. h (contiguous aligned rows) times the expert's W_d^T tile, accumulated over I
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = expert * C * I
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        h = tl.load(H_ptr + rows[:, None].to(tl.int64) * I + ks[None, :],
                    mask=k_ok[None, :], other=0.0)  # read BLOCK_M x BLOCK_K
        w_down = tl.load(WD_ptr + w_base + cols[None, :] * I + ks[:, None],
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # read BLOCK_K x BLOCK_N
        acc = tl.dot(h, w_down, acc, input_precision=DOT_PRECISION)

    # 3. epilogue: the routing weight, then one store at each slot's own row (no atomics)
    weight = tl.load(WEIGHT_ptr + slot, mask=real, other=0.0).to(tl.float32)  # read BLOCK_M
    y = acc * weight[:, None]
    tl.store(Y_SLOT_ptr + slot[:, None].to(tl.int64) * C + cols[None, :], y,
             mask=real[:, None] & col_ok[None, :])  # write BLOCK_M x BLOCK_N (float32)


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _down_backward_kernel(
    DOUT_ptr,
    WD_ptr,
    G_ptr,
    U_ptr,
    WEIGHT_ptr,
    DG_ptr,
    DU_ptr,
    DW_PARTIAL_ptr,
    SORTED_IDS_ptr,
    EXPERT_IDS_ptr,
    NUM_POST_PAD_ptr,
    num_slots,
    top_k,
    C,
    I,
    num_i_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward through the down projection, the routing weight and SwiGLU.

    DOUT_ptr:         (N, C) gradient of the layer's output (its dtype, float32 usually)
    WD_ptr:           (E, C, I) down weights
    G_ptr, U_ptr:     (P, I) gate and up pre-activations saved by the forward
    WEIGHT_ptr:       (num_slots,) routing weights
    DG_ptr, DU_ptr:   (P, I) outputs, x's dtype: gradients of g and u per aligned row
    DW_PARTIAL_ptr:   (P, num_i_tiles) float32 output: this I tile's part of d w_slot
    SORTED_IDS_ptr, EXPERT_IDS_ptr, NUM_POST_PAD_ptr, num_slots, top_k: as in the forward
    C, I:             hidden and expert widths
    num_i_tiles:      ceil(I / BLOCK_N), row stride of DW_PARTIAL
    BLOCK_M:          constexpr, rows per block
    BLOCK_N:          constexpr, I columns per program
    BLOCK_K:          constexpr, C columns per inner step
    DOT_PRECISION:    constexpr, tl.dot input precision
    """
    # 1. block, expert, slots and their tokens
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NUM_POST_PAD_ptr):
        return
    expert = tl.load(EXPERT_IDS_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(SORTED_IDS_ptr + rows)  # read BLOCK_M
    real = slot < num_slots
    token = tl.where(real, slot // top_k, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I

    # 2. a = dOut[token] W_d[e]: the gradient of h before the routing weight; dOut is read
    #    through the token index (the combine's backward is this gather)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = expert * C * I
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        dout = tl.load(DOUT_ptr + token[:, None] * C + ks[None, :],
                       mask=real[:, None] & k_ok[None, :], other=0.0)  # read BLOCK_M x BLOCK_K
        w_down = tl.load(WD_ptr + w_base + ks[:, None] * I + cols[None, :],
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # read BLOCK_K x BLOCK_N
        acc = tl.dot(dout.to(WD_ptr.dtype.element_ty), w_down, acc, input_precision=DOT_PRECISION)

    # 3. recompute h from the saved g, u; this tile's part of d w_slot = sum_i a_i h_i
    offsets = rows[:, None].to(tl.int64) * I + cols[None, :]
    gate = tl.load(G_ptr + offsets, mask=col_ok[None, :], other=0.0).to(tl.float32)  # read BLOCK_M x BLOCK_N
    up = tl.load(U_ptr + offsets, mask=col_ok[None, :], other=0.0).to(tl.float32)  # read BLOCK_M x BLOCK_N
    sig = tl.sigmoid(gate)
    silu = gate * sig
    hidden = silu * up
    tl.store(DW_PARTIAL_ptr + rows.to(tl.int64) * num_i_tiles + pid_n,
             tl.sum(acc * hidden, axis=1))  # write BLOCK_M

    # 4. dh = w * a; SwiGLU backward; store dg, du
    weight = tl.load(WEIGHT_ptr + slot, mask=real, other=0.0).to(tl.float32)  # read BLOCK_M
    d_hidden = acc * weight[:, None]
    d_gate = d_hidden * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = d_hidden * silu
    tl.store(DG_ptr + offsets, d_gate.to(DG_ptr.dtype.element_ty), mask=col_ok[None, :])  # write BLOCK_M x BLOCK_N
    tl.store(DU_ptr + offsets, d_up.to(DU_ptr.dtype.element_ty), mask=col_ok[None, :])  # write BLOCK_M x BLOCK_N


@triton.jit
def _gate_up_backward_kernel(
    DG_ptr,
    DU_ptr,
    WG_ptr,
    WU_ptr,
    DX_SLOT_ptr,
    SORTED_IDS_ptr,
    EXPERT_IDS_ptr,
    NUM_POST_PAD_ptr,
    num_slots,
    C,
    I,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dx_slot = dg W_g[e] + du W_u[e] for one block of aligned rows and one C tile.

    DG_ptr, DU_ptr:   (P, I) from _down_backward_kernel
    WG_ptr, WU_ptr:   (E, I, C) gate and up weights
    DX_SLOT_ptr:      (num_slots, C) float32 output: each slot's gradient of its token row,
                      at the slot's own row (summed over k on the host side)
    SORTED_IDS_ptr, EXPERT_IDS_ptr, NUM_POST_PAD_ptr, num_slots: as in the forward
    C, I:             hidden and expert widths
    BLOCK_M:          constexpr, rows per block
    BLOCK_N:          constexpr, C columns per program
    BLOCK_K:          constexpr, I columns per inner step
    DOT_PRECISION:    constexpr, tl.dot input precision
    """
    # 1. block, expert, slots
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NUM_POST_PAD_ptr):
        return
    expert = tl.load(EXPERT_IDS_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(SORTED_IDS_ptr + rows)  # read BLOCK_M
    real = slot < num_slots
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C

    # 2. two products summed into one accumulator over I
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = expert * I * C
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        offsets = rows[:, None].to(tl.int64) * I + ks[None, :]
        d_gate = tl.load(DG_ptr + offsets, mask=k_ok[None, :], other=0.0)  # read BLOCK_M x BLOCK_K
        d_up = tl.load(DU_ptr + offsets, mask=k_ok[None, :], other=0.0)  # read BLOCK_M x BLOCK_K
        w_offsets = w_base + ks[:, None] * C + cols[None, :]  # (BLOCK_K, BLOCK_N) tile of W[e]
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(WG_ptr + w_offsets, mask=w_mask, other=0.0)  # read BLOCK_K x BLOCK_N
        w_up = tl.load(WU_ptr + w_offsets, mask=w_mask, other=0.0)  # read BLOCK_K x BLOCK_N
        acc = tl.dot(d_gate, w_gate, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(d_up, w_up, acc, input_precision=DOT_PRECISION)

    # 3. one store at each slot's own row (float32; the k slots of a token are summed later)
    tl.store(DX_SLOT_ptr + slot[:, None].to(tl.int64) * C + cols[None, :], acc,
             mask=real[:, None] & col_ok[None, :])  # write BLOCK_M x BLOCK_N


@triton.jit
def _expert_weight_grad_kernel(
    A_ptr,
    B_ptr,
    WEIGHT_ptr,
    OUT_ptr,
    SORTED_IDS_ptr,
    EXPERT_START_ptr,
    EXPERT_END_ptr,
    num_slots,
    top_k,
    DA,
    DB,
    A_BY_TOKEN: tl.constexpr,
    B_BY_TOKEN: tl.constexpr,
    SCALE_A: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[e] = sum over expert e's rows r of a_r^T b_r: one weight gradient tile of one expert.

    A_ptr:            rows of width DA: (P, DA) in the aligned layout, or (N, DA) read
                      through the slots' tokens if A_BY_TOKEN
    B_ptr:            rows of width DB, likewise (B_BY_TOKEN)
    WEIGHT_ptr:       (num_slots,) routing weights; multiply each A row by its slot's weight
                      if SCALE_A
    OUT_ptr:          (E, DA, DB) output, the weight's dtype
    SORTED_IDS_ptr:   (P,) int32 slot of each aligned row, num_slots = padding
    EXPERT_START_ptr: (E,) int32 first aligned row of each expert
    EXPERT_END_ptr:   (E,) int32 end of each expert's padded segment
    num_slots, top_k: M = N * k and k
    DA, DB:           widths of the A and B rows
    A_BY_TOKEN, B_BY_TOKEN, SCALE_A: constexpr flags (above)
    BLOCK_R:          constexpr, rows per inner step
    BLOCK_A, BLOCK_B: constexpr, output tile
    DOT_PRECISION:    constexpr, tl.dot input precision
    """
    # 1. which expert, which output tile; the expert's rows (an empty segment gives zeros)
    expert = tl.program_id(0)
    tile = tl.program_id(1)
    tiles_b = tl.cdiv(DB, BLOCK_B)
    cols_a = (tile // tiles_b) * BLOCK_A + tl.arange(0, BLOCK_A)
    cols_b = (tile % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ok = cols_a < DA
    b_ok = cols_b < DB
    start = tl.load(EXPERT_START_ptr + expert)
    end = tl.load(EXPERT_END_ptr + expert)

    # 2. walk the segment BLOCK_R rows at a time: acc += a^T b
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        in_segment = rows < end
        slot = tl.load(SORTED_IDS_ptr + rows, mask=in_segment, other=num_slots)  # read BLOCK_R
        real = in_segment & (slot < num_slots)
        token = tl.where(real, slot // top_k, 0).to(tl.int64)
        if A_BY_TOKEN:
            a_rows = token
        else:
            a_rows = rows.to(tl.int64)
        if B_BY_TOKEN:
            b_rows = token
        else:
            b_rows = rows.to(tl.int64)
        a = tl.load(A_ptr + a_rows[:, None] * DA + cols_a[None, :],
                    mask=real[:, None] & a_ok[None, :], other=0.0)  # read BLOCK_R x BLOCK_A
        b = tl.load(B_ptr + b_rows[:, None] * DB + cols_b[None, :],
                    mask=real[:, None] & b_ok[None, :], other=0.0)  # read BLOCK_R x BLOCK_B
        if SCALE_A:
            weight = tl.load(WEIGHT_ptr + slot, mask=real, other=0.0).to(tl.float32)
            a = a.to(tl.float32) * weight[:, None]
        acc = tl.dot(tl.trans(a.to(B_ptr.dtype.element_ty)), b, acc, input_precision=DOT_PRECISION)

    # 3. one store of the tile
    out = OUT_ptr + expert.to(tl.int64) * DA * DB + cols_a[:, None] * DB + cols_b[None, :]
    tl.store(out, acc.to(OUT_ptr.dtype.element_ty), mask=a_ok[:, None] & b_ok[None, :])  # write BLOCK_A x BLOCK_B


# True when this module was imported with TRITON_INTERPRET=1 (minimoe.kernel_switch checks it).
INTERPRETED = not isinstance(_gate_up_kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
def _block_m(num_slots: int, num_experts: int) -> int:
    """Rows per block (= the alignment): small when experts get few rows (less padding)."""
    if INTERPRETED:
        return 16
    rows_per_expert = num_slots / max(num_experts, 1)
    if rows_per_expert >= 256:
        return 64
    if rows_per_expert >= 32:
        return 32
    return 16


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the grouped GEMMs (one configuration, not tuned)."""
    if INTERPRETED:
        return dict(BLOCK_N=64, BLOCK_K=64, num_warps=4)
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_N=64, BLOCK_K=block_k, num_warps=4, num_stages=3)


def _weight_grad_config() -> dict:
    if INTERPRETED:
        return dict(BLOCK_R=16, BLOCK_A=64, BLOCK_B=64, num_warps=4)
    return dict(BLOCK_R=32, BLOCK_A=64, BLOCK_B=64, num_warps=4, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 products for float32 operands unless torch itself allows TF32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; only float32 operands look at it


def _weight_grad(a, b, weight, out_shape, dtype, align, a_by_token, b_by_token, scale_a,
                 num_slots, top_k, precision):
    """out[e] = sum over expert e's aligned rows of a_r^T b_r (see _expert_weight_grad_kernel)."""
    sorted_ids, _, _, expert_start, expert_end = align
    E, DA, DB = out_shape
    out = torch.empty(out_shape, dtype=dtype, device=b.device)  # (E, DA, DB)
    cfg = _weight_grad_config()
    grid = (E, triton.cdiv(DA, cfg["BLOCK_A"]) * triton.cdiv(DB, cfg["BLOCK_B"]))
    _expert_weight_grad_kernel[grid](
        a, b, weight, out, sorted_ids, expert_start, expert_end, num_slots, top_k, DA, DB,
        A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, SCALE_A=scale_a,
        DOT_PRECISION=precision, **cfg)
    return out


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class FusedMoEFunction(torch.autograd.Function):
    """autograd glue: alignment + 2 kernels forward, alignment reused + 5 kernels backward."""

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, gate_proj, up_proj, down_proj, mask, grad_needed):
        N, C = x.shape
        k = topk_idx.shape[1]
        E, I, _ = gate_proj.shape
        num_slots = N * k
        device = x.device

        # 1. align: masked slots get the index E, which the alignment skips (int64: E may not
        #    fit a narrow index dtype, e.g. 256 in uint8)
        expert_of_slot = topk_idx.reshape(-1)  # (M,)
        if mask is not None:
            skipped = torch.full_like(expert_of_slot, E, dtype=torch.long)  # (M,)
            expert_of_slot = torch.where(mask.reshape(-1), expert_of_slot.long(), skipped)  # (M,)
        block_m = _block_m(num_slots, E)
        align = align_with_segments(expert_of_slot, E, block_m)
        sorted_ids, expert_ids, total = align[:3]
        P = sorted_ids.numel()
        weight = topk_weight.reshape(-1).contiguous()  # (M,)

        # 2. gate/up + SwiGLU over the aligned rows: read x rows (gathered) and W_g, W_u tiles
        save = grad_needed  # keep g and u only if a backward can follow
        cfg = _config(x.dtype)
        precision = _dot_precision(x.dtype)
        hidden = torch.empty((P, I), dtype=x.dtype, device=device)  # (P, I)
        gate = torch.empty((P, I) if save else (1, 1), dtype=x.dtype, device=device)
        up = torch.empty_like(gate)
        grid_i = (P // block_m, triton.cdiv(I, cfg["BLOCK_N"]))
        if P // block_m > 0:
            _gate_up_kernel[grid_i](
                x, gate_proj, up_proj, hidden, gate, up, sorted_ids, expert_ids, total,
                num_slots, k, C, I, BLOCK_M=block_m, SAVE_PREACT=save,
                DOT_PRECISION=precision, **cfg)

        # 3. down projection with the routing weight; each slot's row of y_slot written once
        y_slot = torch.zeros((num_slots, C), dtype=torch.float32, device=device)  # (M, C)
        grid_c = (P // block_m, triton.cdiv(C, cfg["BLOCK_N"]))
        if P // block_m > 0:
            _down_kernel[grid_c](
                hidden, down_proj, weight, y_slot, sorted_ids, expert_ids, total,
                num_slots, C, I, BLOCK_M=block_m, DOT_PRECISION=precision, **cfg)

        # 4. combine: sum the k slots of each token in float32
        out_dtype = torch.promote_types(x.dtype, topk_weight.dtype)
        out = y_slot.view(N, k, C).sum(dim=1).to(out_dtype)  # (N, C)

        if save:
            ctx.save_for_backward(x, weight, gate_proj, up_proj, down_proj, hidden, gate, up,
                                  *align)
        ctx.shape = (N, k, C, I, E, block_m)
        ctx.weight_dtype = topk_weight.dtype
        return out

    @staticmethod
    def backward(ctx, d_out):
        (x, weight, gate_proj, up_proj, down_proj, hidden, gate, up,
         sorted_ids, expert_ids, total, expert_start, expert_end) = ctx.saved_tensors
        align = (sorted_ids, expert_ids, total, expert_start, expert_end)
        N, k, C, I, E, block_m = ctx.shape
        num_slots = N * k
        P = sorted_ids.numel()
        device = x.device
        d_out = d_out.contiguous()  # (N, C)
        cfg = _config(x.dtype)
        precision = _dot_precision(x.dtype)
        need_x, need_weight, need_gate, need_up, need_down = (
            ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5))
        dx = d_weight = d_gate_proj = d_up_proj = d_down_proj = None

        # 1. through W_d, the routing weight and SwiGLU: dg, du per aligned row, d w partials
        d_gate = torch.empty((P, I), dtype=x.dtype, device=device)  # (P, I)
        d_up = torch.empty_like(d_gate)  # (P, I)
        num_i_tiles = triton.cdiv(I, cfg["BLOCK_N"])
        d_weight_partial = torch.zeros((P, num_i_tiles), dtype=torch.float32, device=device)
        if P // block_m > 0:
            _down_backward_kernel[(P // block_m, num_i_tiles)](
                d_out, down_proj, gate, up, weight, d_gate, d_up, d_weight_partial,
                sorted_ids, expert_ids, total, num_slots, k, C, I, num_i_tiles,
                BLOCK_M=block_m, DOT_PRECISION=precision, **cfg)

        # 2. d topk_weight: sum the I tiles, move each row's value to its slot (row num_slots
        #    of the buffer takes the padding rows and is dropped)
        if need_weight:
            by_slot = torch.zeros(num_slots + 1, dtype=torch.float32, device=device)  # (M+1,)
            by_slot[sorted_ids.long()] = d_weight_partial.sum(dim=1)
            d_weight = by_slot[:num_slots].view(N, k).to(ctx.weight_dtype)  # (N, k)

        # 3. dx: each slot's dg W_g + du W_u at its own row, summed over k in float32
        if need_x:
            dx_slot = torch.zeros((num_slots, C), dtype=torch.float32, device=device)  # (M, C)
            if P // block_m > 0:
                _gate_up_backward_kernel[(P // block_m, triton.cdiv(C, cfg["BLOCK_N"]))](
                    d_gate, d_up, gate_proj, up_proj, dx_slot, sorted_ids, expert_ids, total,
                    num_slots, C, I, BLOCK_M=block_m, DOT_PRECISION=precision, **cfg)
            dx = dx_slot.view(N, k, C).sum(dim=1).to(x.dtype)  # (N, C)

        # 4. weight gradients per expert over its segment of aligned rows
        common = dict(align=align, num_slots=num_slots, top_k=k, precision=precision)
        if need_gate:  # dW_g[e] = dg_e^T x_e   (E, I, C)
            d_gate_proj = _weight_grad(d_gate, x, weight, (E, I, C), gate_proj.dtype,
                                       a_by_token=False, b_by_token=True, scale_a=False, **common)
        if need_up:  # dW_u[e] = du_e^T x_e     (E, I, C)
            d_up_proj = _weight_grad(d_up, x, weight, (E, I, C), up_proj.dtype,
                                     a_by_token=False, b_by_token=True, scale_a=False, **common)
        if need_down:  # dW_d[e] = (w dOut[t])_e^T h_e   (E, C, I)
            d_down_proj = _weight_grad(d_out, hidden, weight, (E, C, I), down_proj.dtype,
                                       a_by_token=True, b_by_token=False, scale_a=True, **common)
        return dx, None, d_weight, d_gate_proj, d_up_proj, d_down_proj, None, None


def fused_moe(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """sum_j w_{t,j} * SwiGLU_{idx_{t,j}}(x_t) with Triton grouped GEMMs; differentiable.

    x (N, C); topk_idx (N, k) integer; topk_weight (N, k) float; gate_proj, up_proj (E, I, C)
    and down_proj (E, C, I) in x's dtype (``RoutedExperts`` layout); x float32, float16 or
    bfloat16; mask (N, k) bool or None: slot (t, j) is computed iff mask is None or
    mask[t, j], other slots contribute 0.
    Tensors on CUDA, or on the CPU under TRITON_INTERPRET=1. Returns (N, C) in
    promote(x.dtype, topk_weight.dtype), the same function as ``minimoe.moe.dispatch_sorted``.
    Gradients flow to x, topk_weight and the three weights.

    check_indices: verify that every computed slot's index lies in [0, E) (a ValueError
    otherwise). It reads the min and max back to the host, a synchronisation; pass False
    when the caller has checked already (``minimoe.moe.dispatch_sorted`` does). Unchecked
    out-of-range slots are skipped.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (N, C), got {tuple(x.shape)}")
    N, C = x.shape
    if gate_proj.dim() != 3 or gate_proj.shape[2] != C:
        raise ValueError(f"gate_proj must be (E, I, C={C}), got {tuple(gate_proj.shape)}")
    E, I, _ = gate_proj.shape
    if up_proj.shape != gate_proj.shape:
        raise ValueError(f"up_proj {tuple(up_proj.shape)} must match gate_proj {(E, I, C)}")
    if down_proj.shape != (E, C, I):
        raise ValueError(f"down_proj must be (E, C, I) = {(E, C, I)}, got {tuple(down_proj.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be one of {DTYPES} (the kernels' tl.dot operands), got {x.dtype}")
    for name, w in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
        if w.dtype != x.dtype:
            raise ValueError(f"{name} is {w.dtype}, but x is {x.dtype}: the kernels need one dtype")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != N:
        raise ValueError(f"topk_idx must be (N={N}, k), got {tuple(topk_idx.shape)}")
    if topk_idx.dtype.is_floating_point or topk_idx.dtype == torch.bool:
        raise ValueError(f"topk_idx must hold integer expert indices, got {topk_idx.dtype}")
    if topk_weight.shape != topk_idx.shape:
        raise ValueError(f"topk_weight {tuple(topk_weight.shape)} must match topk_idx "
                         f"{tuple(topk_idx.shape)}")
    if mask is not None and (mask.shape != topk_idx.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(topk_idx.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if check_indices:
        computed = topk_idx if mask is None else topk_idx[mask]
        if computed.numel() > 0:
            low, high = int(computed.min()), int(computed.max())
            if low < 0 or high >= E:
                raise ValueError(f"expert indices of computed slots must lie in [0, {E}); got "
                                 f"[{low}, {high}] (exclude other slots with `mask`)")
    grad_needed = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, topk_weight, gate_proj, up_proj, down_proj))
    return FusedMoEFunction.apply(x.contiguous(), topk_idx, topk_weight, gate_proj.contiguous(),
                                  up_proj.contiguous(), down_proj.contiguous(), mask, grad_needed)
