"""The MoE layer: route every token to k experts, run each expert on its tokens, combine.

Notebook 01, sections 4-6, builds this layer step by step; the details, the costs and the
choices behind them live here.

How an MoE layer computes
-------------------------
For N tokens x_t (width C) the router (``minimoe.router``) returns, per token, k expert
indices idx_{t,j} and gate weights g_{t,j}. The layer's output is

    y_t = sum_{j<k} g_{t,j} * FFN_{idx_{t,j}}(x_t)   +   FFN_shared(x_t)

(DeepSeekMoE, Dai et al. 2024, §3, Eq. 3-5: fine-grained routed experts plus always-on
shared experts; ``minimoe.experts`` has the FFN itself). The formula is a sum over N*k
*token-slots* (t, j). All the work of this module is in evaluating that sum well:

* **dispatch**: bring each slot's token to the expert that must process it;
* **expert compute**: every expert runs its SwiGLU on the rows it received;
* **combine**: scale each result by its gate weight and add it back to its token's row.

GShard (Lepikhin et al. 2020) wrote dispatch and combine as einsums with one-hot
(tokens x experts x capacity) tensors, which suits TPUs but wastes memory. Here are three
ways that do not materialise anything of size N * E:

1. ``dispatch_naive`` -- the readable reference (the loop of the Hugging Face
   ``DeepseekV3MoE.moe``): for e = 0..E-1, find the slots routed to e
   (``torch.where(topk_idx == e)``), gather those tokens, run expert e, multiply by the
   weights and ``index_add_`` the result into the output rows.

2. ``dispatch_sorted`` -- the sort-based scheme of MegaBlocks (Gale et al. 2022,
   "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", §5) and of vLLM's
   ``moe_align_block_size``:

       expert_of_slot  = topk_idx.flatten()                       (N*k,)
       order           = argsort(expert_of_slot, stable=True)     (M,)  slots grouped by expert
       counts          = bincount(expert_of_slot, minlength=E)    (E,)  rows per expert
       x_sorted        = x[order // k]                            (M, C) one gather
       offsets         = cumsum(counts)                           (E,)  end row of each group
       h               = silu(x_sorted W_g[e]^T) * (x_sorted W_u[e]^T)   row block of e
       y_sorted        = h W_d[e]^T                               (M, C)
       y               = index_add(0, order // k, g[order] * y_sorted)   (N, C)

   After the sort, expert e's rows are one contiguous block x_sorted[offsets[e-1]:
   offsets[e]], so a single *grouped* matrix multiply -- "for each block, multiply by that
   block's expert matrix" -- serves all experts at once. MegaBlocks calls this a
   block-sparse matmul; vLLM pads each block to a multiple of the kernel's tile
   (moe_align_block_size) so that one Triton kernel launch covers all experts. PyTorch
   exposes the operation as ``torch._grouped_mm(a (M, K), b (E, K, N), offs=cumsum(counts)
   as int32)``: the same thing cuBLAS / CUTLASS grouped GEMM does on Hopper GPUs.

3. ``dispatch_gather`` -- for decoding, when there are fewer slots than experts (N*k <= E):
   gather every slot's own expert matrices and run one batched product per projection
   (gpt-fast's Mixtral, pytorch-labs/gpt-fast mixtral-moe/model.py,
   its ConditionalFeedForward):

       W_g[idx], W_u[idx]  (N, k, I, C),   W_d[idx]  (N, k, C, I)    one gather each
       h_{t,j} = silu(W_g[idx_{t,j}] x_t) * (W_u[idx_{t,j}] x_t)    (N, k, I)  batched
       y_t     = sum_j g_{t,j} * W_d[idx_{t,j}] h_{t,j}              (N, C)

   It reads N*k expert matrices where the sorted path reads up to E of them, and every
   shape is fixed by (N, k): no sort, no counts, nothing the data decides, so a compiled
   decode step (``minimoe.static_cache``, which picks it whenever N*k <= E) is one graph
   with a handful of batched matmuls. For training or prefill it is the wrong tool: it
   copies N*k weight matrices, and its backward scatters N*k gradients into full-size zeros.

Which grouped matmul runs (``grouped_mm_backend``)
--------------------------------------------------
``torch._grouped_mm`` is a private operator; where it exists and what it accepts depends
on the build. On the CPU build of torch 2.13 it works for float32, bfloat16 and float16,
forward and backward, including groups of 0 rows (experts nobody chose); it rejects
float64, and it needs the row strides of its operands to be multiples of 16 bytes (C and I
multiples of 4 in float32, of 8 in bf16). On CUDA, builds run it in bf16 on recent
(Hopper-class) GPUs; elsewhere it may be missing. ``grouped_mm_backend(device, dtype, C,
I)`` therefore probes it once per (device, dtype) on a tiny problem with an empty group,
compares forward and backward with plain matmuls, and returns

    "grouped_mm"  -- torch._grouped_mm runs the grouped products;
    "loop"        -- a Python loop over the E contiguous blocks of the *sorted* rows with
                     ordinary matmuls (``rows.split(counts)``, ``W.unbind(0)``): still one
                     gather and one scatter for the whole layer, only the E matmuls are
                     launched one by one.

The CPU ``_grouped_mm`` is itself a loop of per-group matmuls inside C++; its value here is
that the same call becomes one kernel on a GPU. Autograd differentiates it with grouped
products again: dA = GMM(dY, W^T) and dW_e = A_e^T dY_e over the same blocks.

torch.compile
-------------
Compiling the model traces this module with fake tensors (``minimoe.traceable`` explains the
mechanism). Three things here would stop it, and each has a cure chosen to leave the eager
code as it reads:

* ``torch._grouped_mm``'s meta function on the CPU build of torch 2.13 accepts bfloat16 only,
  although its kernel runs float32: tracing the float32 sorted dispatch failed. While
  compiling, ``grouped_swiglu`` calls the same kernel through the custom op
  ``minimoe::grouped_mm`` (``minimoe.traceable``), whose fake function states only the
  output's shape, and whose backward is the same grouped products. (The "loop" backend
  would trace too, but ``counts.tolist()`` reads data: a graph break per layer.)
* ``torch.bincount(..., minlength=E)`` has a data-dependent length; the counts come from a
  scatter-add into E zeros instead (``count_per_expert``), the same numbers in both modes.
* The index check reads values (``int(min)``); compiled, it is an assertion inside the graph.

With these, ``torch._dynamo.explain`` finds no graph break in a training forward of the toy
with the sorted dispatch (MLA, GQA and MHA alike). The naive dispatch keeps its breaks:
``torch.where(topk_idx == e)`` has as many rows as tokens chose expert e, a shape only the
data decides; compiled, it runs as one small graph per expert visit (19 breaks for the
toy), correct but no faster -- compile the sorted dispatch.

What the sorted path costs on a CPU
-----------------------------------
The naive and sorted dispatches do the same arithmetic: 3 matmuls of 2 M C I flops forward,
6 backward (M = N * k slots). The sorted path spends nearly all its time in them (80% of a
profile on 2 cores with expert width 256, 90% with 1024): there is little left to win
without a faster matmul. Measured on the 2-core development CPU (8192 tokens, C = 512, 64
experts, top-6, float32, forward + backward): naive 1.56 s vs sorted 0.80 s at I = 256
(1.9x), naive 6.9 s vs sorted 2.8 s at I = 1024 (2.4x); repeated runs vary by 10-20%. A
hand-written ``torch.autograd.Function`` for the whole block (recomputing silu, in-place
temporaries) was measured as well: no faster, and with a *higher* peak memory, because a
custom Function keeps all its saved tensors until its backward returns, while autograd frees
each node's saved tensors as soon as that node is done. Large fresh buffers do matter on a
CPU (the first touch of each page of a new 100 MB tensor costs page faults), which is also
why the naive loop's backward, with its full-size zero gradients, is slow.
``python -m minimoe.bench.moe_dispatch`` prints the comparison.

Zero-computation experts (LongCat-Flash technical report, §2)
------------------------------------------------------------
LongCat-Flash adds n_zero_experts *identity* experts to its FFN experts: a slot routed to
one of them (index >= n_routed_experts) contributes g_{t,j} * x_t and costs nothing, so
each token decides how much compute it needs. The dispatch functions never see those
slots (the ``mask`` argument excludes them); ``MoE.forward`` adds them as one
``weight * x`` term. Whether routed_scaling_factor applies to identity experts was an open
question between runtimes (sglang issue #10019: sglang scaled only the FFN experts' output;
the released Hugging Face modelling code multiplies *every* top-k weight, identity experts
included). minimoe follows the released modelling code: the router's weights already carry
the factor, and an identity slot contributes exactly topk_weight * x.

Capacity (token dropping)
-------------------------
With ``cfg.capacity_factor`` set, ``minimoe.balance.capacity_keep_mask`` (GShard order)
decides which slots fit into their expert's buffer of C = ceil(cf * N * k / E) slots, with
E = n_routed_experts + n_zero_experts (all experts share the top-k). A dropped slot
contributes nothing; the token still receives the shared experts and, outside this layer,
its residual. Identity-expert slots are never dropped: they need no buffer.

What the reader should notice
-----------------------------
* The three dispatches compute the same function (the tests compare outputs and gradients).
* Why the naive loop is slow: E small matmuls launched from Python, E scans of the whole
  (N, k) routing table, and -- less obvious -- in backward every ``gate_proj[e]`` indexing
  op writes a full (E, I, C) zero tensor with one expert's gradient in it, E times per
  weight; every ``x[token]`` gather likewise writes a full (N, C) gradient per expert.
  The sorted path gathers once, scatters once, and its backward runs grouped products
  ``dX_sorted = dH W`` and ``dW_e = dH_e^T X_e`` over the same blocks.
* Sorting makes each expert's tokens contiguous: that is the whole trick, and it is also
  what expert parallelism needs (the all-to-all sends contiguous blocks to each device).
* The combine accumulates in float32 (the gate weights are float32); the layer casts the
  routed output back to x.dtype.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimoe import balance, kernel_switch
from minimoe.config import ModelConfig
from minimoe.experts import RoutedExperts, SwiGLU
from minimoe.traceable import check, count_per_expert, grouped_mm as compile_grouped_mm
from minimoe.router import Router

GROUPED_MM_BACKENDS = ("grouped_mm", "loop")
# Expert widths I up to which grouped_swiglu runs gate and up as one grouped product with
# [W_g; W_u]. Narrow products run far below the matmul peak, and stacking doubles their
# width; the price is a copy of the stacked weights each forward (and a split of their
# gradient). Measured on the 2-core development CPU, experts' forward + backward, stacked
# vs separate: the toy (E 16, C 128, I 64, 4096 rows) 7.4 vs 9.0 ms; E 64, C 512, 49152
# rows: I 64 1.16x faster, I 128 1.09x faster, I 256 1.05x slower.
FUSED_GATE_UP_MAX_WIDTH = 128
PROBE_RESULTS: dict = {}  # (device type, index, dtype) -> bool, what torch.compile reads


# ----------------------------------------------------------------------------------------------
# Checks shared by the dispatches
# ----------------------------------------------------------------------------------------------
def _check_routing(x, topk_idx, topk_weight, experts, mask) -> None:
    """Shapes, and every computed slot's expert index in [0, experts.num_experts)."""
    if x.dim() != 2 or x.shape[1] != experts.hidden_size:
        raise ValueError(f"x must be (N, {experts.hidden_size}), got {tuple(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be (N={x.shape[0]}, k), got {tuple(topk_idx.shape)}")
    if topk_weight.shape != topk_idx.shape:
        raise ValueError(f"topk_weight {tuple(topk_weight.shape)} must match topk_idx "
                         f"{tuple(topk_idx.shape)}")
    if mask is not None and mask.shape != topk_idx.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match topk_idx {tuple(topk_idx.shape)}")
    if torch.compiler.is_compiling():  # the same check inside the graph (minimoe.traceable)
        in_range = (topk_idx >= 0) & (topk_idx < experts.num_experts)  # (N, k)
        if mask is not None:
            in_range = in_range | ~mask
        check(in_range.all(), f"expert indices of computed slots must lie in "
                              f"[0, {experts.num_experts})")
        return
    computed = topk_idx if mask is None else topk_idx[mask]
    if computed.numel() > 0:
        low, high = int(computed.min()), int(computed.max())
        if low < 0 or high >= experts.num_experts:
            raise ValueError(
                f"expert indices of computed slots must lie in [0, {experts.num_experts}); got "
                f"[{low}, {high}] (exclude zero-computation or dropped slots with `mask`)"
            )


def _output_dtype(x: torch.Tensor, topk_weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, topk_weight.dtype)


# ----------------------------------------------------------------------------------------------
# 1. The naive loop over experts
# ----------------------------------------------------------------------------------------------
def dispatch_naive(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    experts: RoutedExperts,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """sum_j w_{t,j} * expert_{idx_{t,j}}(x_t) by a loop over experts; the readable reference.

    x (N, C); topk_idx (N, k) long; topk_weight (N, k); mask (N, k) bool or None.
    Slot (t, j) is computed iff mask is None or mask[t, j]; every computed slot must name a
    routed expert, 0 <= idx < experts.num_experts (ValueError otherwise). Slots outside the
    mask contribute 0. Returns (N, C) in promote(x.dtype, topk_weight.dtype).
    """
    _check_routing(x, topk_idx, topk_weight, experts, mask)
    N, C = x.shape
    out = torch.zeros(N, C, dtype=_output_dtype(x, topk_weight), device=x.device)  # (N, C)
    for e in range(experts.num_experts):
        chosen = topk_idx == e  # (N, k)
        if mask is not None:
            chosen = chosen & mask
        token, slot = torch.where(chosen)  # (n_e,), (n_e,)  which tokens, which of their k slots
        if token.numel() == 0:
            continue  # nobody chose expert e
        y = experts.expert_forward(e, x[token])  # (n_e, C)
        weight = topk_weight[token, slot].unsqueeze(-1)  # (n_e, 1)
        out.index_add_(0, token, (y * weight).to(out.dtype))  # out[token[i]] += w_i * y_i
    return out


# ----------------------------------------------------------------------------------------------
# 2. Sort by expert, grouped matmuls
# ----------------------------------------------------------------------------------------------
def _grouped_linear_loop(rows: torch.Tensor, sizes: list, weight: torch.Tensor) -> torch.Tensor:
    """The "loop" backend. rows (M, K) in E contiguous blocks of `sizes`; weight (E, N_out, K).

    Returns (M, N_out), block e = rows_e @ weight[e]^T. ``split`` and ``unbind`` rather than
    slicing and indexing: their backward is one concatenation and one stack, where E slices
    would each write a full-size zero gradient (the naive loop's problem).
    """
    blocks = rows.split(sizes)  # E x (n_e, K)
    mats = weight.unbind(0)  # E x (N_out, K)
    return torch.cat([block @ mat.T for block, mat in zip(blocks, mats)])  # (M, N_out)


@functools.lru_cache(maxsize=None)
def _probe_grouped_mm(device_type: str, device_index: Optional[int], dtype: torch.dtype) -> bool:
    """Does torch._grouped_mm give the right forward and backward on this device and dtype?"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index) if device_index is not None else device_type
    # The probe runs a backward: it must work even when called under no_grad / inference_mode,
    # and inside an activation-checkpointed forward (the first forward of a process may be
    # one), where the checkpoint's saved-tensor hooks would otherwise count the probe's saved
    # tensors in the first pass but not in the recompute: plain hooks shield them.
    # Autocast off: the answer is cached, so it must not depend on the caller's context.
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
            torch.autocast(device_type, enabled=False):
        works = _run_grouped_mm_probe(device, dtype)
    PROBE_RESULTS[device_type, device_index, dtype] = works
    return works


def _run_grouped_mm_probe(device, dtype: torch.dtype) -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        sizes = [3, 0, 5, 2]  # one expert with no rows
        a = torch.randn(10, 16, generator=gen).to(device=device, dtype=dtype)  # (M, K)
        w = torch.randn(4, 8, 16, generator=gen).to(device=device, dtype=dtype)  # (E, N, K)
        grad = torch.randn(10, 8, generator=gen).to(device=device, dtype=dtype)  # (M, N)
        offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)  # (E,)
        a1, w1 = a.clone().requires_grad_(), w.clone().requires_grad_()
        out = torch._grouped_mm(a1, w1.transpose(-2, -1), offs=offs)  # (M, N)
        out.backward(grad)
        a2, w2 = a.float().requires_grad_(), w.float().requires_grad_()
        ref = _grouped_linear_loop(a2, sizes, w2)
        ref.backward(grad.float())
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return all(torch.allclose(p.float(), q, rtol=tol, atol=tol)
                   for p, q in ((out, ref), (a1.grad, a2.grad), (w1.grad, w2.grad)))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_backend(device, dtype: torch.dtype, hidden_size: Optional[int] = None,
                       intermediate_size: Optional[int] = None) -> str:
    """Which grouped-matmul path ``dispatch_sorted`` takes: "grouped_mm" or "loop".

    "grouped_mm" when torch._grouped_mm passes a forward+backward probe on (device, dtype)
    (cached) and, if sizes are given, C and I rows are multiples of 16 bytes (its stride rule).
    """
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    if torch.compiler.is_compiling() and key in PROBE_RESULTS:
        works = PROBE_RESULTS[key]  # a constant for the graph (the probe itself cannot be traced)
    else:
        works = _probe_grouped_mm(*key)
    if not works:
        return "loop"
    item = torch.empty((), dtype=dtype).element_size()
    for size in (hidden_size, intermediate_size):
        if size is not None and (size * item) % 16 != 0:
            return "loop"
    return "grouped_mm"


def _eager_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)  # (M, N)


def _scale_rows(hidden: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    if row_scale is None:
        return hidden
    return (hidden * row_scale.unsqueeze(-1)).to(hidden.dtype)  # (M, I)


def grouped_swiglu(rows: torch.Tensor, counts: torch.Tensor, experts: RoutedExperts,
                   backend: str, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expert e's SwiGLU on its contiguous block of expert-sorted rows: (M, C) -> (M, C).

    rows are sorted by expert; counts (E,) rows per expert (zeros allowed); row_scale (M,)
    or None multiplies each row's hidden activation before the down projection.
    GMM(A, W) below = row block e of A times W[e]; autograd differentiates it as
    dA = GMM(dY, W^T) and dW[e] = A_e^T dY_e -- the backward is grouped matmuls too.
    Experts that bring their own grouped products (``minimoe.fp8.Fp8RoutedExperts``, which
    ``minimoe.fp8.convert_to_fp8`` swaps in for FP8 training) run those instead.
    """
    if hasattr(experts, "grouped_swiglu"):
        return experts.grouped_swiglu(rows, counts, row_scale)  # (M, C)
    if backend == "grouped_mm":
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's block
        # torch._grouped_mm(a (M, K), b (E, K, N), offs) -> (M, N): block e of a times b[e].
        # (Its CPU backward rejects a zero-stride incoming gradient, e.g. that of y.sum(); each
        # product here feeds an elementwise op whose gradient is a fresh, contiguous tensor.)
        # Under torch.compile the same kernel runs as the custom op minimoe::grouped_mm, whose
        # fake function the compiler can trace in float32 (see "torch.compile" above).
        gmm = compile_grouped_mm if torch.compiler.is_compiling() else _eager_grouped_mm
        if experts.intermediate_size <= FUSED_GATE_UP_MAX_WIDTH:
            # narrow experts: gate and up read the same rows, so one grouped product with W_g
            # and W_u stacked along the output axis, [W_g; W_u] (E, 2I, C), makes half the
            # matmul calls (forward and backward) and twice as wide ones, for one copy of
            # the stacked weights (see FUSED_GATE_UP_MAX_WIDTH)
            gate_up_proj = torch.cat([experts.gate_proj, experts.up_proj], dim=1)  # (E, 2I, C)
            gate_up = gmm(rows, gate_up_proj.transpose(-2, -1), offs)  # (M, 2I)
            gate, up = gate_up.split(experts.intermediate_size, dim=-1)  # (M, I) each
        else:
            gate = gmm(rows, experts.gate_proj.transpose(-2, -1), offs)  # (M, I)
            up = gmm(rows, experts.up_proj.transpose(-2, -1), offs)  # (M, I)
        hidden = _scale_rows(F.silu(gate) * up, row_scale)  # (M, I)
        return gmm(hidden, experts.down_proj.transpose(-2, -1), offs)  # (M, C)
    if backend == "loop":
        sizes = counts.tolist()  # rows per expert, as Python ints
        gate = _grouped_linear_loop(rows, sizes, experts.gate_proj)  # (M, I)
        up = _grouped_linear_loop(rows, sizes, experts.up_proj)  # (M, I)
        hidden = _scale_rows(F.silu(gate) * up, row_scale)  # (M, I)
        return _grouped_linear_loop(hidden, sizes, experts.down_proj)  # (M, C)
    raise ValueError(f"backend must be one of {GROUPED_MM_BACKENDS}, got {backend!r}")


def dispatch_sorted(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    experts: RoutedExperts,
    mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Same function as ``dispatch_naive``, computed sort-based with grouped matmuls.

    Arguments and result as ``dispatch_naive``. backend: None = ``grouped_mm_backend(...)``
    for this device, dtype and size; or force "grouped_mm" / "loop".
    Steps (M = number of computed slots):
      1. flatten the N*k slots, drop those outside the mask               (M,)
      2. stable argsort by expert; counts per expert by bincount          (M,), (E,)
      3. gather the slots' token rows in that order                       (M, C)
      4. grouped SwiGLU: each expert's contiguous block times its weights (M, C)
      5. multiply by the gate weights; index_add_ back to the token rows  (N, C)
         (the weight multiplies h before W_d instead when I < C: same product)
    With kernels="triton" (``minimoe.kernel_switch``) and backend None, all five steps run as
    ``minimoe.kernels.fused_moe`` (aligned grouped GEMMs, gather and SwiGLU fused) when the
    weights are in x's dtype, that dtype is float32, float16 or bfloat16, and not FP8.
    """
    _check_routing(x, topk_idx, topk_weight, experts, mask)
    kernel = kernel_switch.fused_moe_kernel(x) if backend is None else None
    if (kernel is not None and experts.gate_proj.dtype == x.dtype
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and not hasattr(experts, "grouped_swiglu")):
        return kernel(x, topk_idx, topk_weight, experts.gate_proj, experts.up_proj,
                      experts.down_proj, mask=mask, check_indices=False)  # (N, C)
    N, C = x.shape
    k = topk_idx.shape[1]
    E = experts.num_experts
    if backend is None:
        backend = grouped_mm_backend(x.device, x.dtype, C, experts.intermediate_size)
        if experts.gate_proj.dtype != x.dtype:
            # e.g. bf16 activations and float32 weights under autocast: torch._grouped_mm is
            # not on autocast's lists (its operands must share a dtype), the loop's matmuls are
            backend = "loop"
    if backend not in GROUPED_MM_BACKENDS:
        raise ValueError(f"backend must be one of {GROUPED_MM_BACKENDS}, got {backend!r}")

    # BEGIN SOLUTION sorted-dispatch
    # 1. one entry per computed token-slot; slot s belongs to token s // k
    slot = torch.arange(N * k, device=x.device)  # (N*k,)
    expert_of_slot = topk_idx.reshape(-1)  # (N*k,)
    if mask is not None:
        slot = slot[mask.reshape(-1)]  # (M,)
        expert_of_slot = expert_of_slot[slot]  # (M,)

    # 2. group the slots by expert (stable: inside a group, slots stay in token order)
    order = torch.argsort(expert_of_slot, stable=True)  # (M,)
    sorted_slot = slot[order]  # (M,)
    token = sorted_slot // k  # (M,) the token each sorted row came from
    weight = topk_weight.reshape(-1)[sorted_slot]  # (M,) gradient flows back to topk_weight
    counts = count_per_expert(expert_of_slot, E)  # (E,) rows of each expert's block (bincount)

    # 3.-4. one gather, then every expert on its contiguous block. The gate weight is linear:
    # w * (h W_d^T) = (w * h) W_d^T, so apply it on the narrower of h (M, I) and y (M, C).
    rows = x.index_select(0, token)  # (M, C)
    if experts.intermediate_size < C:
        y = grouped_swiglu(rows, counts, experts, backend, row_scale=weight)  # (M, C) weighted
    else:
        y = grouped_swiglu(rows, counts, experts, backend) * weight.unsqueeze(-1)  # (M, C)

    # 5. combine: one scatter-add back to the tokens (float32 accumulation)
    out = torch.zeros(N, C, dtype=_output_dtype(x, topk_weight), device=x.device)  # (N, C)
    return out.index_add_(0, token, y.to(out.dtype))  # (N, C)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------
# 3. Gather each slot's expert weights (decoding: fewer slots than experts)
# ----------------------------------------------------------------------------------------------
def dispatch_gather(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    experts: RoutedExperts,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same function as ``dispatch_naive``, computed on each slot's gathered expert weights.

    Arguments and result as ``dispatch_naive``. Every shape depends on (N, k) only, which is
    what a compiled decode step needs; the cost is N*k copies of an expert's matrices, so use
    it when N*k <= E (one token per sequence per step). A slot outside the mask is computed
    with expert 0 and multiplied by a zero weight. FP8 experts bring their own grouped
    products: they take ``dispatch_sorted``.
    """
    _check_routing(x, topk_idx, topk_weight, experts, mask)
    if hasattr(experts, "grouped_swiglu"):
        return dispatch_sorted(x, topk_idx, topk_weight, experts, mask=mask)  # (N, C)
    if mask is not None:
        topk_idx = topk_idx.masked_fill(~mask, 0)  # (N, k) any valid expert ...
        topk_weight = topk_weight.masked_fill(~mask, 0.0)  # (N, k) ... with weight 0
    gate_w = experts.gate_proj[topk_idx]  # (N, k, I, C) slot (t, j)'s own expert matrices
    up_w = experts.up_proj[topk_idx]  # (N, k, I, C)
    down_w = experts.down_proj[topk_idx]  # (N, k, C, I)
    gate = torch.einsum("nc,nkic->nki", x, gate_w)  # (N, k, I)
    up = torch.einsum("nc,nkic->nki", x, up_w)  # (N, k, I)
    y = torch.einsum("nki,nkci->nkc", F.silu(gate) * up, down_w)  # (N, k, C)
    # combine: weight each slot, sum over the k slots (float32 accumulation)
    out_dtype = _output_dtype(x, topk_weight)
    return (y.to(out_dtype) * topk_weight.to(out_dtype).unsqueeze(-1)).sum(dim=1)  # (N, C)


DISPATCHES = {"naive": dispatch_naive, "sorted": dispatch_sorted, "gather": dispatch_gather}


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------
class MoE(nn.Module):
    """Router + routed experts (+ zero-computation experts) + shared experts.

    Submodule names follow the Hugging Face DeepseekV3MoE (so checkpoints map directly):
      gate            minimoe.router.Router(cfg)
      experts         RoutedExperts(n_routed_experts, C, moe_intermediate_size)
      shared_experts  SwiGLU(C, n_shared_experts * moe_intermediate_size) or None
    ``dispatch``: which of ``DISPATCHES`` runs the routed experts -- cfg.dispatch, unless
    ``dispatch_override`` names another for this layer (``minimoe.static_cache`` sets
    "gather" for its decode steps, and puts None back after).
    Buffer tokens_per_expert (E,) long, not saved: kept slots per expert (all E = routed +
    zero experts) counted in training mode since the last ``update_expert_bias``. Long,
    not float: ``model.to(torch.bfloat16)`` converts float buffers, and bf16 cannot count
    past 256 exactly.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.is_moe:
            raise ValueError(f"ModelConfig({cfg.name}) has n_routed_experts=0: no MoE layer")
        self.cfg = cfg
        self.n_routed_experts = cfg.n_routed_experts
        self.n_zero_experts = cfg.n_zero_experts
        self.n_experts = cfg.n_routed_experts + cfg.n_zero_experts  # E: what the router scores
        self.top_k = cfg.num_experts_per_tok
        self.dispatch_override: Optional[str] = None  # None: cfg.dispatch
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size,
                                     cfg.moe_intermediate_size, init_std=cfg.initializer_range)
        if cfg.n_shared_experts > 0:
            self.shared_experts = SwiGLU(cfg.hidden_size,
                                         cfg.n_shared_experts * cfg.moe_intermediate_size)
        else:
            self.shared_experts = None
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts, dtype=torch.long),
                             persistent=False)  # (E,)
        weight = self.experts.gate_proj
        if cfg.dispatch != "naive" and weight.device.type != "meta":  # answer ready for compile
            grouped_mm_backend(weight.device, weight.dtype)

    @property
    def dispatch(self) -> str:
        """"naive" | "sorted" | "gather": the key of ``DISPATCHES`` this layer runs."""
        return self.dispatch_override or self.cfg.dispatch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x (B, T, C) -> (y (B, T, C), aux {"losses": {...}, "router": router_stats})."""
        cfg = self.cfg
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)

        # 1. routing: k experts and k gate weights per token
        route = self.gate(flat)
        topk_idx, topk_weight = route.topk_idx, route.topk_weight  # (N, k) long, (N, k) float32
        is_zero = topk_idx >= self.n_routed_experts  # (N, k) identity-expert slots

        # 2. capacity: which slots fit in their expert's buffer (identity slots always fit)
        keep = None
        if cfg.capacity_factor is not None:
            keep = balance.capacity_keep_mask(topk_idx, topk_weight, self.n_experts,
                                              cfg.capacity_factor)  # (N, k)
            keep = keep | is_zero
        routed_mask = None  # None = every slot goes to an FFN expert (the common case)
        if self.n_zero_experts > 0 or keep is not None:
            routed_mask = ~is_zero if keep is None else keep & ~is_zero  # (N, k)

        # 3. routed FFN experts (float32 accumulation), then identity experts: weight * x
        routed = self.routed_output(flat, topk_idx, topk_weight, routed_mask)  # (N, C)
        if self.n_zero_experts > 0:
            zero_weight = (topk_weight * is_zero).sum(dim=-1, keepdim=True)  # (N, 1)
            routed = routed + zero_weight * flat  # (N, C)
        y = routed.to(x.dtype)  # (N, C)

        # 4. shared experts see every token
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)  # (N, C)

        # 5. balance losses (training only, coefficient already applied) and statistics
        losses: dict = {}
        if self.training:
            if cfg.aux_loss_alpha > 0:
                probs = route.scores / route.scores.sum(dim=-1, keepdim=True)  # (N, E)
                losses["aux"] = cfg.aux_loss_alpha * balance.switch_aux_loss(probs, topk_idx)
            if cfg.seq_aux_loss_alpha > 0:
                losses["seq_aux"] = cfg.seq_aux_loss_alpha * balance.sequence_aux_loss(
                    route.scores.view(B, T, self.n_experts), topk_idx.view(B, T, self.top_k))
            if cfg.z_loss_coef > 0:
                losses["z"] = cfg.z_loss_coef * balance.router_z_loss(route.logits)
        stats = balance.router_stats(topk_idx, route.scores, self.n_experts, keep_mask=keep)
        if self.training:
            self.tokens_per_expert += stats["tokens_per_expert"].to(self.tokens_per_expert.device)
        return y.view(B, T, C), {"losses": losses, "router": stats}

    def routed_output(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
        """sum_j w_{t,j} FFN_{idx_{t,j}}(x_t) over the slots in mask: x (N, C) -> (N, C).

        The one place where tokens meet the routed experts; ``minimoe.parallel`` overrides it
        to send the tokens to experts that live in other processes."""
        dispatch = DISPATCHES[self.dispatch]
        return dispatch(x, topk_idx, topk_weight, self.experts, mask=mask)  # (N, C)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step from the counted loads; then reset the counter."""
        cfg = self.cfg
        if cfg.use_expert_bias and cfg.bias_update_rate > 0:
            balance.update_expert_bias(self.gate.e_score_correction_bias, self.tokens_per_expert,
                                       cfg.bias_update_rate, cfg.bias_update_zero_mean)
        self.tokens_per_expert.zero_()

    def extra_repr(self) -> str:
        return (f"routed={self.n_routed_experts}, zero={self.n_zero_experts}, top_k={self.top_k}, "
                f"dispatch={self.dispatch!r}")
