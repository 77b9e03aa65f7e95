"""The MoE router in Triton: logits -> (top-k experts, gate weights, scores), one kernel per pass.

Motivation
----------
``minimoe.router`` turns the router logits u (N, E) into the routing decision with a chain
of small PyTorch ops: softmax or sigmoid, add the selection bias, view as groups, group
max or top-2 sum, top-k of the groups, scatter a keep mask, masked_fill with -inf, top-k of
the experts, gather, sum, divide, multiply. Each op is a kernel launch that reads and
writes an (N, E) or (N, G) tensor. The whole thing is a few hundred FLOPs per token, so at
decode sizes (N <= 256 tokens) its time is launch overhead, a dozen launches of a few
microseconds each, not arithmetic. One Triton program per token row holds the row's E
logits in registers and does every step there: one launch, one read of u and the bias,
one write of the scores and of the 2k results.

The formulas (``minimoe.router``; DeepSeek-V3 technical report §2.1.2, DeepSeek-V2 §2.2):

    s   = softmax(u)  or  sigmoid(u)                          (E,)  one row
    s'  = s + b                                               (E,)  b: selection-only bias
    G_g = max_{i in g} s'_i  or  top1 + top2 of s' in g       (G,)  if n_group > 1
    keep the topk_group best groups; s'_i = -inf elsewhere
    idx = TopK(s', k)                                         (k,)  by decreasing s'
    w   = s[idx] (/ (sum s[idx] + 1e-20)) * routed_scaling_factor

How the row is laid out
-----------------------
The E logits of a row are loaded as a 2-D block (BLOCK_GROUPS, BLOCK_PER_GROUP): row g
holds group g's E / n_group experts, padded to powers of two and masked (with n_group = 1
it is a single row of E). Group scores are then plain reductions along axis 1, and
"expert i is in a kept group" is a broadcast of a (BLOCK_GROUPS,) mask.

Top-k is k rounds of "take the maximum, find its position, remove it". Each round is two
reductions over the row (a max, then the smallest flat position that holds that max), so
equal values resolve to the LOWER expert index, round by round. torch.topk does not
document which of two equal values it returns first; with continuous random inputs ties do
not happen, and on real logits they are as rare as two float32 logits being equal. The same
rule picks the groups (lower group index first on a tie) and the top-2 of a group (the
second-best of a group whose maximum appears twice equals the maximum, as in torch.topk).

Backward
--------
The chosen indices are a discrete decision: no gradient. The gate weights and the scores
are smooth functions of the logits. With w'_j = s[idx_j], S = sum_j w'_j + 1e-20, r = rsf:

    with renormalisation   dL/dw'_j = r * (dL/dw_j - sum_i dL/dw_i * w'_i / S) / S
    without                dL/dw'_j = r * dL/dw_j
    ds_e   = dL/ds_e + sum_{j : idx_j = e} dL/dw'_j             the scores are outputs too
    du_e   = s_e * (ds_e - sum_i ds_i s_i)                          softmax
    du_e   = ds_e * s_e * (1 - s_e)                                 sigmoid

A second kernel does this per row from the saved scores and indices (one read of s and
dL/ds, k indices; one write of du). Both kernels compute in float32, or in float64 when the
logits are float64 (so ``torch.autograd.gradcheck`` can check the backward).

Running it without a GPU: set ``TRITON_INTERPRET=1`` before triton is first imported; see
``minimoe.kernel_switch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

SCORING_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


@triton.jit
def _router_forward_kernel(
    LOGITS_ptr,
    logits_row_stride,
    BIAS_ptr,
    SCORES_ptr,
    IDX_ptr,
    WEIGHT_ptr,
    n_experts,
    per_group,
    routed_scaling_factor,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
    BLOCK_PER_GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One token row: scores, group-limited biased top-k, gate weights.

    LOGITS_ptr:            (N, E) router logits, float32 or float64, unit column stride
    logits_row_stride:     elements between two rows of LOGITS
    BIAS_ptr:              (E,) selection bias in the logits' dtype (unused without HAS_BIAS)
    SCORES_ptr:            (N, E) output, contiguous: softmax / sigmoid of the logits, no bias
    IDX_ptr:               (N, TOP_K) int64 output, contiguous: chosen experts, by decreasing s + b
    WEIGHT_ptr:            (N, TOP_K) output, contiguous: gate weights from the unbiased scores
    n_experts:             E
    per_group:             E // N_GROUP experts per group (E when N_GROUP == 1)
    routed_scaling_factor: multiplies every gate weight
    SOFTMAX:               constexpr, True: softmax over the E logits; False: sigmoid
    HAS_BIAS:              constexpr, whether BIAS_ptr is read
    N_GROUP:               constexpr, number of expert groups (1: no group limit)
    TOPK_GROUP:            constexpr, groups a token may use (ignored when N_GROUP == 1)
    GROUP_TOP2:            constexpr, group score = top1 + top2 (V3) instead of max (V2)
    TOP_K:                 constexpr, experts per token k
    NORMALIZE:             constexpr, divide the k weights by their sum (+ 1e-20)
    BLOCK_GROUPS:          constexpr, next power of two >= N_GROUP
    BLOCK_PER_GROUP:       constexpr, next power of two >= per_group
    BLOCK_K:               constexpr, next power of two >= TOP_K
    """
    # 1. this row; the (group, member) grid and the expert index of each cell
    row = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, BLOCK_GROUPS)  # (BG,)
    member = tl.arange(0, BLOCK_PER_GROUP)  # (BP,)
    expert = group[:, None] * per_group + member[None, :]  # (BG, BP) flat expert index
    valid = (group[:, None] < N_GROUP) & (member[None, :] < per_group)  # (BG, BP) real experts
    big = BLOCK_GROUPS * BLOCK_PER_GROUP  # larger than any flat index: "no position"
    # padding cells would alias the next group's indices: give them the index "big"
    cell = tl.where(valid, expert, big)  # (BG, BP)

    # 2. the logits (float32, or float64 for gradient checks); padding is -inf
    u = tl.load(LOGITS_ptr + row * logits_row_stride + expert, mask=valid,
                other=float("-inf"))  # read E
    u = u.to(SCORES_ptr.dtype.element_ty)

    # 3. scores: softmax over the row (padding gives exp(-inf) = 0) or sigmoid per expert
    if SOFTMAX:
        row_max = tl.max(tl.max(u, axis=1), axis=0)
        numerator = tl.exp(u - row_max)  # (BG, BP)
        scores = numerator / tl.sum(tl.sum(numerator, axis=1), axis=0)
    else:
        scores = 1.0 / (1.0 + tl.exp(-u))  # (BG, BP)
    tl.store(SCORES_ptr + row * n_experts + expert, scores, mask=valid)  # write E

    # 4. the choice scores s' = s + b; padding stays -inf so it is never chosen
    choice = scores
    if HAS_BIAS:
        bias = tl.load(BIAS_ptr + expert, mask=valid, other=0.0)  # read E (cached across rows)
        choice = choice + bias.to(scores.dtype)
    choice = tl.where(valid, choice, float("-inf"))  # (BG, BP)

    # 5. group limit: score each group, keep the TOPK_GROUP best, -inf everywhere else
    if N_GROUP > 1:
        best = tl.max(choice, axis=1)  # (BG,) group max
        if GROUP_TOP2:
            # remove the first position holding the maximum, the next maximum is the second
            first = tl.min(tl.where(choice == best[:, None], member[None, :], BLOCK_PER_GROUP),
                           axis=1)  # (BG,)
            second = tl.max(tl.where(member[None, :] == first[:, None], float("-inf"), choice),
                            axis=1)  # (BG,)
            group_score = best + second  # (BG,) top-2 sum
        else:
            group_score = best  # (BG,) max
        group_score = tl.where(group < N_GROUP, group_score, float("-inf"))
        keep = group < 0  # (BG,) all False
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_score, axis=0)
            winner = tl.min(tl.where(group_score == top, group, BLOCK_GROUPS), axis=0)
            keep = keep | (group == winner)
            group_score = tl.where(group == winner, float("-inf"), group_score)
        choice = tl.where(keep[:, None], choice, float("-inf"))  # (BG, BP)

    # 6. top-k: TOP_K rounds of "largest choice score, lowest expert on a tie, remove it";
    #    the gate weight is the UNBIASED score of the chosen expert
    slot = tl.arange(0, BLOCK_K)  # (BK,) the k results live in registers
    chosen = tl.zeros((BLOCK_K,), dtype=tl.int64)  # (BK,)
    weights = tl.zeros((BLOCK_K,), dtype=scores.dtype)  # (BK,)
    for j in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        position = tl.min(tl.min(tl.where(choice == top, cell, big), axis=1), axis=0)
        hit = cell == position  # (BG, BP) exactly one cell
        weight = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=1), axis=0)
        chosen = tl.where(slot == j, position.to(tl.int64), chosen)
        weights = tl.where(slot == j, weight, weights)
        choice = tl.where(hit, float("-inf"), choice)  # removed for the next rounds

    # 7. renormalise over the k (as the reference: w / (sum + 1e-20)), then scale
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * routed_scaling_factor
    tl.store(IDX_ptr + row * TOP_K + slot, chosen, mask=slot < TOP_K)  # write k
    tl.store(WEIGHT_ptr + row * TOP_K + slot, weights, mask=slot < TOP_K)  # write k


@triton.jit
def _router_backward_kernel(
    dLOGITS_ptr,
    SCORES_ptr,
    dSCORES_ptr,
    IDX_ptr,
    dWEIGHT_ptr,
    n_experts,
    routed_scaling_factor,
    SOFTMAX: tl.constexpr,
    HAS_DSCORES: tl.constexpr,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One token row: d logits from d weights (and d scores), analytically.

    dLOGITS_ptr:           (N, E) output, contiguous, the scores' dtype
    SCORES_ptr:            (N, E) scores saved by the forward, contiguous
    dSCORES_ptr:           (N, E) upstream gradient of the scores, contiguous (unused without HAS_DSCORES)
    IDX_ptr:               (N, TOP_K) int64 chosen experts saved by the forward, contiguous
    dWEIGHT_ptr:           (N, TOP_K) upstream gradient of the gate weights, contiguous
    n_experts:             E
    routed_scaling_factor: the forward's factor r
    SOFTMAX:               constexpr, True: scores were softmax; False: sigmoid
    HAS_DSCORES:           constexpr, whether the scores received a gradient
    TOP_K:                 constexpr, experts per token k
    NORMALIZE:             constexpr, the forward renormalised the k weights
    BLOCK_E:               constexpr, next power of two >= E
    BLOCK_K:               constexpr, next power of two >= TOP_K
    """
    # 1. this row, its scores and their upstream gradient
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < n_experts
    slot = tl.arange(0, BLOCK_K)
    slot_mask = slot < TOP_K
    s = tl.load(SCORES_ptr + row * n_experts + cols, mask=col_mask, other=0.0)  # read E
    if HAS_DSCORES:
        ds = tl.load(dSCORES_ptr + row * n_experts + cols, mask=col_mask, other=0.0)  # read E
        ds = ds.to(s.dtype)
    else:
        ds = tl.zeros((BLOCK_E,), dtype=s.dtype)
    dw = tl.load(dWEIGHT_ptr + row * TOP_K + slot, mask=slot_mask, other=0.0).to(s.dtype)  # read k

    # 2. the un-normalised weights w'_j = s[idx_j], gathered again from the row
    w = tl.zeros((BLOCK_K,), dtype=s.dtype)
    for j in tl.static_range(TOP_K):
        e = tl.load(IDX_ptr + row * TOP_K + j)  # read 1
        w = tl.where(slot == j, tl.sum(tl.where(cols == e, s, 0.0), axis=0), w)

    # 3. through the scaling and the renormalisation: dL/dw'
    if NORMALIZE:
        total = tl.sum(w, axis=0) + 1e-20
        dw_raw = routed_scaling_factor * (dw - tl.sum(dw * w, axis=0) / total) / total
    else:
        dw_raw = routed_scaling_factor * dw

    # 4. the gather's backward: add dL/dw'_j to the chosen expert's score gradient
    for j in tl.static_range(TOP_K):
        e = tl.load(IDX_ptr + row * TOP_K + j)  # read 1 (cached)
        ds += tl.where(cols == e, tl.sum(tl.where(slot == j, dw_raw, 0.0), axis=0), 0.0)

    # 5. through softmax (a row reduction) or sigmoid (elementwise)
    if SOFTMAX:
        du = s * (ds - tl.sum(ds * s, axis=0))
    else:
        du = ds * s * (1.0 - s)
    tl.store(dLOGITS_ptr + row * n_experts + cols, du, mask=col_mask)  # write E


# True when this module was imported with TRITON_INTERPRET=1: @triton.jit then built
# interpreted Python functions instead of GPU kernels (minimoe.kernel_switch checks it).
INTERPRETED = not isinstance(_router_forward_kernel, triton.runtime.JITFunction)


def _num_warps(block: int) -> int:
    """Warps per row: one warp holds 256 scores in 8 registers per thread; more for wider rows."""
    if block <= 256:
        return 1
    if block <= 1024:
        return 2
    return 4


class RouterFunction(torch.autograd.Function):
    """autograd glue: one forward kernel, one backward kernel; the indices get no gradient."""

    @staticmethod
    def forward(ctx, logits, bias, top_k, n_group, topk_group, group_top2, softmax, normalize,
                routed_scaling_factor):
        N, E = logits.shape
        per_group = E // n_group
        scores = torch.empty((N, E), dtype=logits.dtype, device=logits.device)  # (N, E)
        topk_idx = torch.empty((N, top_k), dtype=torch.int64, device=logits.device)  # (N, k)
        topk_weight = torch.empty((N, top_k), dtype=logits.dtype, device=logits.device)  # (N, k)
        if N > 0:
            block_groups = triton.next_power_of_2(n_group)
            block_per_group = triton.next_power_of_2(per_group)
            _router_forward_kernel[(N,)](
                logits, logits.stride(0), bias if bias is not None else logits, scores,
                topk_idx, topk_weight, E, per_group, float(routed_scaling_factor),
                SOFTMAX=softmax, HAS_BIAS=bias is not None, N_GROUP=n_group,
                TOPK_GROUP=topk_group, GROUP_TOP2=group_top2, TOP_K=top_k, NORMALIZE=normalize,
                BLOCK_GROUPS=block_groups, BLOCK_PER_GROUP=block_per_group,
                BLOCK_K=triton.next_power_of_2(top_k),
                num_warps=_num_warps(block_groups * block_per_group),
            )
        ctx.mark_non_differentiable(topk_idx)
        ctx.save_for_backward(scores, topk_idx)
        ctx.settings = (top_k, softmax, normalize, float(routed_scaling_factor))
        return topk_idx, topk_weight, scores

    @staticmethod
    def backward(ctx, d_idx, d_weight, d_scores):
        scores, topk_idx = ctx.saved_tensors
        top_k, softmax, normalize, routed_scaling_factor = ctx.settings
        N, E = scores.shape
        if d_weight is None:
            d_weight = torch.zeros_like(topk_idx, dtype=scores.dtype)  # (N, k)
        d_weight = d_weight.contiguous()
        if d_scores is not None:
            d_scores = d_scores.contiguous()
        d_logits = torch.empty_like(scores)  # (N, E)
        if N > 0:
            block_e = triton.next_power_of_2(E)
            _router_backward_kernel[(N,)](
                d_logits, scores, d_scores if d_scores is not None else scores, topk_idx,
                d_weight, E, routed_scaling_factor, SOFTMAX=softmax,
                HAS_DSCORES=d_scores is not None, TOP_K=top_k, NORMALIZE=normalize,
                BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
                num_warps=_num_warps(block_e),
            )
        return d_logits, None, None, None, None, None, None, None, None


def route(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "top2_sum",
    scoring_func: str = "sigmoid",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of the routing half of ``minimoe.router.Router.forward``.

    logits: (N, E) float32 (float64 is accepted, for gradient checks) on CUDA, or on the CPU
    under TRITON_INTERPRET=1; bias: (E,) selection-only bias or None. Returns

        topk_idx    (N, k) int64    chosen experts, ordered by decreasing biased score
        topk_weight (N, k) float32  gate weights from the unbiased scores (renormalised if
                                    norm_topk_prob, times routed_scaling_factor)
        scores      (N, E) float32  softmax / sigmoid of the logits, without the bias

    the same numbers as ``scores``, ``select_experts`` and ``gate_weights`` of
    ``minimoe.router`` (up to float rounding; equal choice scores go to the lower expert
    index). topk_weight and scores are differentiable in the logits.
    """
    if logits.dim() != 2:
        raise ValueError(f"route expects logits of shape (N, E), got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"route expects float32 (or float64) logits, got {logits.dtype}")
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    N, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if n_group < 1:
        raise ValueError(f"n_group must be >= 1, got {n_group}")
    if n_group > 1:
        if E % n_group != 0:
            raise ValueError(f"E={E} experts cannot be split into n_group={n_group} equal groups")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
        if topk_group * (E // n_group) < top_k:
            raise ValueError(f"topk_group={topk_group} groups of {E // n_group} experts hold fewer "
                             f"than top_k={top_k} experts")
        if group_score == "top2_sum" and E // n_group < 2:
            raise ValueError("group_score='top2_sum' needs at least 2 experts per group")
    else:
        topk_group = 1
    if bias is not None:
        if bias.shape != (E,):
            raise ValueError(f"bias must have shape (E,) = ({E},), got {tuple(bias.shape)}")
        bias = bias.to(device=logits.device, dtype=logits.dtype).contiguous()  # (E,)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return RouterFunction.apply(
        logits, bias, top_k, n_group, topk_group, group_score == "top2_sum",
        scoring_func == "softmax", bool(norm_topk_prob), routed_scaling_factor,
    )
