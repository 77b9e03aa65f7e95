"""Benchmark suite: the Triton kernels of the MoE hot path against PyTorch, on one GPU.

    python -m minimoe.bench.kernels            # the full suite (a few minutes on an H100)
    python -m minimoe.bench.kernels --quick    # fewer token counts
    python -m minimoe.bench.kernels --out DIR  # csv, markdown and figures all into DIR

What is measured
----------------
1. The device itself, in the same run: the bf16 matmul peak (one large square bf16 matmul,
   TFLOP/s) and the copy bandwidth (one large tensor copy, GB/s counting read + write).
   Every speed target is a fraction of these two numbers, never an absolute number taken
   from another machine.
2. Each kernel against (a) the naive minimoe reference, the readable PyTorch code the kernel
   replaces, and (b) the best native PyTorch path: ``torch.compile`` of the reference for
   the router, RMSNorm and RoPE, and for the MoE experts ``dispatch_sorted`` with
   ``torch._grouped_mm`` (permutation and combine included):

       router     minimoe.kernels.moe_router.route   vs scores + select_experts + gate_weights
       rmsnorm    minimoe.kernels.rmsnorm.rms_norm   vs minimoe.norm.RMSNorm
       rope       minimoe.kernels.rope.apply_rotary  vs minimoe.rope.apply_rotary
       moe_fwd    minimoe.kernels.fused_moe          vs dispatch_naive, dispatch_sorted
       moe_bwd    (forward + backward) - forward, the same three

   on the shapes of DeepSeek-V3 (hidden 7168, expert FFN 2048, 256 experts, top-8, 8 groups
   keep 4; MLA rotary: 128 heads x 64) and Ling-mini-2.0 (hidden 2048, expert FFN 512, 256
   experts, top-8, 8 groups keep 4; GQA rotary: 16 heads x 128, half rotated), token counts
   1 ... 16384 (powers of 4), the MoE with uniform and with skewed (Zipf, s = 1.2) routing.
   The fused MoE is optional: without ``minimoe.kernels.fused_moe`` its rows are left out.

Each time is the median of ``triton.testing.do_bench`` (which empties the L2 cache before
every run). The router, RMSNorm and RoPE at <= 1024 tokens are small enough that the Python
and launch overhead of a call (tens of microseconds) would hide the kernels, so there every
contender is replayed from a CUDA graph (``do_bench_cudagraph``, as a decode step captured in
a graph runs them; the note column says so); from 4096 tokens on, do_bench times the eager
calls. The table adds TFLOP/s, GB/s and the percentage of the measured peak:

    router   bytes = logits read + scores written (4 N E each) + k indices and weights
    rmsnorm  bytes = x read + y written (2 N C each in bf16)
    rope     bytes = x read + y written + the cos / sin tables
    moe      FLOPs = 3 matmuls of 2 M C I (forward), twice that more (backward), M = N k;
             bytes = the weights of the experts that received at least one token (the
             "touched" experts, 3 I C each) + x and the output. At small N the touched
             weights are nearly all the traffic: a decode step reads them once for a few
             rows each, so the speed limit is the copy bandwidth, not the matmul peak.

Targets (printed beside each result, as fractions of what this run measured):
    moe_fwd at 16384 tokens   >= 60% of the bf16 matmul peak, >= 0.9x the grouped_mm path
    moe_fwd at <= 1024 tokens >= 70% of the copy bandwidth in touched expert weights
    router at <= 256 tokens   <= 5 us at 256 experts, and >= 5x the naive PyTorch router
    rmsnorm, rope             >= 80% of the copy bandwidth (from 4096 tokens, where the
                              tensors are large enough), >= 1.5x eager PyTorch

Output: a CSV and a markdown table (default notebooks/results/kernels_bench.{csv,md}) and a
roofline and a speed-up figure (kernels_roofline.png, kernels_speedup.png; under
runs/bench/kernels/ unless --out or --publish says otherwise).

Without a CUDA GPU the suite says so and checks correctness only: under TRITON_INTERPRET=1
(set before starting Python) it runs each kernel against its reference on small CPU shapes;
without it it says that the interpreter is needed and times the reference code on the CPU at
tiny sizes. It writes kernels_bench_cpu.{csv,md} (never overwriting the GPU results) and
prints the table. The exit status is 1 when a correctness check failed (GPU or CPU), else 0.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from minimoe.bench import progress, results_dir
from minimoe.config import ModelConfig
from minimoe.experts import RoutedExperts
from minimoe.moe import dispatch_naive, dispatch_sorted, grouped_mm_backend
from minimoe.norm import RMSNorm
from minimoe.rope import apply_rotary as rope_reference
from minimoe.router import gate_weights, select_experts

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["section", "kernel", "model", "tokens", "routing", "impl", "median_us", "flops",
           "bytes", "tflops", "gbps", "pct_peak_flops", "pct_copy_bw", "speedup_vs_naive", "speedup_vs_best",
           "target", "target_met", "max_abs_err", "passed", "note"]
TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
TOKENS_QUICK = [1, 256, 16384]
ZIPF_EXPONENT = 1.2
GRAPH_TOKENS = 1024  # router, RMSNorm, RoPE up to this many tokens are timed from a CUDA graph


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What each kernel needs to know about one model."""

    name: str
    hidden: int  # C
    ffn: int  # I, one routed expert's width
    experts: int  # E
    top_k: int  # k
    n_group: int
    topk_group: int
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    rope_heads: int  # heads whose rotary part is rotated (queries)
    head_dim: int  # width of the rotated tensor's last axis
    rotary_dim: int  # how much of it is rotated


def shape_of(preset: str) -> Shape:
    """The benchmark shape of a published preset (minimoe.config)."""
    cfg = ModelConfig.preset(preset)
    if cfg.attention == "mla":  # the decoupled rotary part of the queries: H x qk_rope_head_dim
        heads, head_dim, rotary_dim = cfg.num_attention_heads, cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
    else:
        head_dim = cfg.head_dim
        heads, rotary_dim = cfg.num_attention_heads, int(head_dim * cfg.partial_rotary_factor)
    return Shape(preset, cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                 cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.scoring_func,
                 cfg.norm_topk_prob, cfg.routed_scaling_factor, heads, head_dim, rotary_dim)


MODELS = ("deepseek-v3", "ling-mini-2.0")


# ----------------------------------------------------------------------------------------------
# The MoE roofline, on paper
# ----------------------------------------------------------------------------------------------
def expected_touched_experts(tokens: int, experts: int, top_k: int) -> float:
    """Experts with at least one token, on average, when each token picks k of E uniformly.

    P(a given expert is missed by one token) = 1 - k/E, so E (1 - (1 - k/E)^N) are touched.
    """
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def moe_arithmetic_intensity(tokens: int, hidden: int, ffn: int, experts: int, top_k: int,
                             bytes_per_value: int = 2, touched: Optional[float] = None) -> dict:
    """FLOPs, bytes and FLOP/byte of one routed-expert forward (SwiGLU experts, no shared).

    flops  = 3 matmuls * 2 * (N k) * C * I
    bytes  = touched experts * 3 I C (weights) + N C (input) + N C (output), in bf16 values
    touched defaults to ``expected_touched_experts`` (uniform routing).
    """
    if touched is None:
        touched = expected_touched_experts(tokens, experts, top_k)
    flops = 3 * 2 * tokens * top_k * hidden * ffn
    weight_bytes = touched * 3 * ffn * hidden * bytes_per_value
    activation_bytes = 2 * tokens * hidden * bytes_per_value
    return {"tokens": tokens, "touched_experts": touched, "flops": flops,
            "weight_bytes": weight_bytes, "activation_bytes": activation_bytes,
            "intensity": flops / (weight_bytes + activation_bytes)}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float:
    """Median milliseconds of fn(): triton's do_bench on CUDA, perf_counter on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                              return_mode="median"))
    fn()
    runs = []
    for _ in range(3 if quick else 7):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def time_ms_graph(fn: Callable[[], object], device: torch.device, quick: bool = False
                  ) -> tuple[float, str]:
    """(median milliseconds, how): fn replayed from a CUDA graph where it can be captured.

    ``do_bench_cudagraph`` gives the device time of the kernels without the Python and
    launch overhead of each call, as a decode step captured in a CUDA graph runs them. It
    does not empty the L2 cache, so the suite uses it for small tensors only. Where fn
    cannot be captured (a host synchronisation, ...) it is timed eagerly instead.
    """
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        try:
            return float(do_bench_cudagraph(fn, rep=10 if quick else 20,
                                            return_mode="median")), "cuda graph"
        except Exception:
            torch.cuda.synchronize()
            return time_ms(fn, device, quick), "eager (not capturable)"
    return time_ms(fn, device, quick), ""


def measure_device(device: torch.device, quick: bool) -> dict:
    """bf16 matmul peak (TFLOP/s) and copy bandwidth (GB/s, read + write) of this device."""
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    matmul_ms = time_ms(lambda: a @ b, device, quick)
    values = (1 << 28) if device.type == "cuda" else (1 << 22)  # 512 MiB / 8 MiB of bf16
    src = torch.empty(values, device=device, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick)
    del a, b, src, dst
    return {"peak_tflops": 2 * size**3 / (matmul_ms * 1e-3) / 1e12,
            "copy_gbps": 2 * values * 2 / (copy_ms * 1e-3) / 1e9}


# ----------------------------------------------------------------------------------------------
# The contenders for each kernel
# ----------------------------------------------------------------------------------------------
def reference_route(logits, bias, shape: Shape):
    """The router's steps after the logits, as minimoe.router.Router.forward runs them."""
    scores = logits.softmax(dim=-1) if shape.scoring_func == "softmax" else logits.sigmoid()
    idx = select_experts(scores, shape.top_k, bias=bias, n_group=shape.n_group,
                         topk_group=shape.topk_group, group_score="top2_sum")
    weights = gate_weights(scores, idx, norm_topk_prob=shape.norm_topk_prob,
                           routed_scaling_factor=shape.routed_scaling_factor)
    return idx, weights, scores


def kernel_route(logits, bias, shape: Shape):
    from minimoe.kernels.moe_router import route

    return route(logits, bias, top_k=shape.top_k, n_group=shape.n_group,
                 topk_group=shape.topk_group, group_score="top2_sum",
                 scoring_func=shape.scoring_func, norm_topk_prob=shape.norm_topk_prob,
                 routed_scaling_factor=shape.routed_scaling_factor)


def fused_moe_or_reason():
    """(minimoe.kernels.fused_moe.fused_moe, None), or (None, why it cannot be imported)."""
    try:
        from minimoe.kernels.fused_moe import fused_moe
    except Exception as error:  # missing module, or one that does not import here
        return None, f"minimoe.kernels.fused_moe unavailable ({type(error).__name__}: {error})"
    return fused_moe, None


def make_experts(shape: Shape, device, dtype, std: float = 0.02) -> RoutedExperts:
    """RoutedExperts with random weights made directly on the device in dtype (no float32 copy)."""
    with torch.device("meta"):
        experts = RoutedExperts(shape.experts, shape.hidden, shape.ffn)
    E, C, I = shape.experts, shape.hidden, shape.ffn
    experts.gate_proj = torch.nn.Parameter(torch.randn(E, I, C, device=device, dtype=dtype) * std)
    experts.up_proj = torch.nn.Parameter(torch.randn(E, I, C, device=device, dtype=dtype) * std)
    experts.down_proj = torch.nn.Parameter(torch.randn(E, C, I, device=device, dtype=dtype) * std)
    return experts


def make_routing(tokens: int, shape: Shape, routing: str, device, generator=None):
    """(topk_idx (N, k) long, topk_weight (N, k) float32): k distinct experts per token.

    "uniform": each token picks k experts uniformly; "zipf": expert r (in a fixed random
    order) is picked with probability proportional to 1 / r^1.2, so a few experts get most
    of the tokens (the load an unbalanced router produces).
    """
    E, k = shape.experts, shape.top_k
    if routing == "uniform":
        idx = torch.rand(tokens, E, generator=generator).topk(k, dim=-1).indices  # (N, k)
    elif routing == "zipf":
        rank = torch.randperm(E, generator=generator).float() + 1  # (E,)
        probs = rank.pow(-ZIPF_EXPONENT)  # (E,)
        idx = torch.multinomial(probs.expand(tokens, E), k, replacement=False, generator=generator)
    else:
        raise ValueError(f"routing must be 'uniform' or 'zipf', got {routing!r}")
    weight = torch.rand(tokens, k, generator=generator) + 0.1  # (N, k)
    weight = weight / weight.sum(dim=-1, keepdim=True)
    return idx.to(device), weight.to(device)


def _compiled(fn: Callable, notes: list) -> Optional[Callable]:
    """torch.compile(fn, dynamic=True), or None (with a note) where it cannot run."""
    try:
        return torch.compile(fn, dynamic=True)
    except Exception as error:  # pragma: no cover - depends on the installation
        notes.append(f"torch.compile unavailable: {type(error).__name__}")
        return None


# ----------------------------------------------------------------------------------------------
# Correctness: each kernel against its reference on small shapes
# ----------------------------------------------------------------------------------------------
def _sig(value: float, digits: int = 3) -> float:
    """value rounded to `digits` significant figures (small numbers keep their digits)."""
    return float(f"{value:.{digits}g}")


def _row(**values) -> dict:
    row = {column: "" for column in COLUMNS}
    row.update(values)
    return row


def check_router(device) -> dict:
    shape = Shape("small", 64, 32, 64, 6, 8, 3, "sigmoid", True, 2.5, 4, 64, 32)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(33, 64, generator=gen) * 2).to(device)
    bias = (torch.randn(64, generator=gen) * 0.2).to(device)
    d_weight = torch.randn(33, 6, generator=gen).to(device)
    grads = []
    outputs = []
    for fn in (reference_route, kernel_route):
        u = logits.clone().requires_grad_()
        idx, w, s = fn(u, bias, shape)
        (w * d_weight).sum().backward()
        outputs.append((idx, w, s))
        grads.append(u.grad)
    (idx_ref, w_ref, s_ref), (idx, w, s) = outputs
    err = max((w - w_ref).abs().max().item(), (s - s_ref).abs().max().item(),
              (grads[0] - grads[1]).abs().max().item())
    ok = torch.equal(idx, idx_ref) and err < 1e-5
    return _row(section="correctness", kernel="router", model="N33 E64 k6 groups 8/3",
                impl="triton", max_abs_err=f"{err:.2e}", passed=ok,
                note="indices equal" if torch.equal(idx, idx_ref) else "indices differ")


def check_rmsnorm(device) -> dict:
    from minimoe.kernels.rmsnorm import rms_norm

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(33, 256, generator=gen).to(device)
    norm = RMSNorm(256).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, generator=gen))
    err = (rms_norm(x, norm.weight, norm.eps) - norm(x)).abs().max().item()
    return _row(section="correctness", kernel="rmsnorm", model="(33, 256) float32", impl="triton",
                max_abs_err=f"{err:.2e}", passed=err < 1e-5)


def check_rope(device) -> dict:
    from minimoe.kernels.rope import apply_rotary

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 33, 64, generator=gen).to(device)
    angle = torch.randn(33, 16, generator=gen).repeat(1, 2).to(device)  # (T, 32) rotate-half tables
    cos, sin = angle.cos(), angle.sin()
    err = (apply_rotary(x, cos, sin) - rope_reference(x, cos, sin)).abs().max().item()
    return _row(section="correctness", kernel="rope", model="(1, 4, 33, 64) rotary 32",
                impl="triton", max_abs_err=f"{err:.2e}", passed=err < 1e-5)


def check_fused_moe(device, fused_moe) -> dict:
    shape = Shape("small", 64, 32, 8, 2, 1, 1, "softmax", False, 1.0, 1, 64, 64)
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    experts = make_experts(shape, device, torch.float32, std=0.1)
    x = torch.randn(33, 64, generator=gen).to(device)
    idx, weight = make_routing(33, shape, "zipf", device, generator=gen)
    d_out = torch.randn(33, 64, generator=gen).to(device)
    results = []
    for run in ("reference", "kernel"):
        x_ = x.clone().requires_grad_()
        w_ = weight.clone().requires_grad_()
        params = [experts.gate_proj, experts.up_proj, experts.down_proj]
        for p in params:
            p.grad = None
        if run == "reference":
            out = dispatch_naive(x_, idx, w_, experts)
        else:
            out = fused_moe(x_, idx, w_, *params)
        out.backward(d_out)
        results.append([out.detach(), x_.grad, w_.grad] + [p.grad.clone() for p in params])
    err = max((a - b).abs().max().item() for a, b in zip(*results))
    return _row(section="correctness", kernel="moe_fwd+bwd", model="N33 C64 I32 E8 k2 float32",
                impl="triton", max_abs_err=f"{err:.2e}", passed=err < 1e-4,
                note="output and all gradients")


def correctness_rows(device) -> list:
    rows = []
    for name, check in (("router", check_router), ("rmsnorm", check_rmsnorm), ("rope", check_rope)):
        rows.append(_guarded(check, name, device))
    fused_moe, reason = fused_moe_or_reason()
    if fused_moe is None:
        rows.append(_row(section="correctness", kernel="moe_fwd+bwd", impl="triton", note=reason))
    else:
        rows.append(_guarded(lambda d: check_fused_moe(d, fused_moe), "moe_fwd+bwd", device))
    return rows


def _guarded(check, name, device) -> dict:
    try:
        return check(device)
    except Exception as error:  # a kernel that fails is a failed row, not a crash of the suite
        return _row(section="correctness", kernel=name, impl="triton", passed=False,
                    note=f"{type(error).__name__}: {str(error)[:120]}")


# ----------------------------------------------------------------------------------------------
# Timings on a GPU
# ----------------------------------------------------------------------------------------------
class Recorder:
    """Collects timing rows; fills the derived columns from the device's measured peaks."""

    def __init__(self, device, peaks: dict, quick: bool):
        self.device, self.peaks, self.quick = device, peaks, quick
        self.rows: list[dict] = []

    def time(self, fn, graph: bool = False, **where) -> Optional[float]:
        """Time fn and add a row; None (and a row with the reason) if it fails."""
        how = ""
        try:
            if graph:
                ms, how = time_ms_graph(fn, self.device, self.quick)
            else:
                ms = time_ms(fn, self.device, self.quick)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            self.rows.append(_row(section="timing", **where, note="out of memory"))
            return None
        except Exception as error:
            self.rows.append(_row(section="timing", **where,
                                  note=f"{type(error).__name__}: {str(error)[:100]}"))
            return None
        self.rows.append(_row(section="timing", median_us=_sig(ms * 1e3, 4), **where,
                              note=how))
        return ms

    def finish_group(self, start: int, flops: float, bytes_moved: float, target: str = "",
                     judge: Optional[Callable[[dict], bool]] = None) -> None:
        """Derived columns for the rows added since `start` (one kernel, shape, token count)."""
        group = [r for r in self.rows[start:] if r["median_us"] != ""]
        by_impl = {r["impl"]: r["median_us"] for r in group}
        naive = by_impl.get("naive")
        best = min((by_impl[i] for i in by_impl if i not in ("naive", "triton")), default=None)
        for row in group:
            seconds = row["median_us"] * 1e-6
            row["bytes"] = int(bytes_moved)
            if flops:
                row["flops"] = int(flops)
                row["tflops"] = _sig(flops / seconds / 1e12)
                row["pct_peak_flops"] = _sig(100 * flops / seconds / 1e12 / self.peaks["peak_tflops"])
            row["gbps"] = _sig(bytes_moved / seconds / 1e9)
            row["pct_copy_bw"] = _sig(100 * bytes_moved / seconds / 1e9 / self.peaks["copy_gbps"])
            if naive:
                row["speedup_vs_naive"] = _sig(naive / row["median_us"])
            if best:
                row["speedup_vs_best"] = _sig(best / row["median_us"])
            if row["impl"] == "triton" and judge is not None:
                row["target"] = target
                row["target_met"] = "yes" if judge(row) else "NO"


def bench_router(rec: Recorder, shape: Shape, tokens_list, compiled_ok: bool) -> None:
    device = rec.device
    notes: list = []
    compiled = _compiled(lambda u, b: reference_route(u, b, shape), notes) if compiled_ok else None
    bias = torch.randn(shape.experts, device=device) * 0.1
    for tokens in tokens_list:
        logits = torch.randn(tokens, shape.experts, device=device)
        where = dict(kernel="router", model=shape.name, tokens=tokens, routing="-",
                     graph=tokens <= GRAPH_TOKENS)
        start = len(rec.rows)
        with torch.no_grad():  # routing for inference; the backward is not timed here
            rec.time(lambda: reference_route(logits, bias, shape), impl="naive", **where)
            if compiled is not None:
                rec.time(lambda: compiled(logits, bias), impl="torch.compile", **where)
            rec.time(lambda: kernel_route(logits, bias, shape), impl="triton", **where)
        bytes_moved = 8 * tokens * shape.experts + 12 * tokens * shape.top_k + 4 * shape.experts
        small = tokens <= 256 and shape.experts >= 256
        rec.finish_group(
            start, 0.0, bytes_moved,
            target="<= 5 us, >= 5x naive" if small else ">= 5x naive",
            judge=lambda r: (r["median_us"] <= 5.0 or not small) and r["speedup_vs_naive"] != ""
            and r["speedup_vs_naive"] >= 5)


def _bandwidth_target(tokens: int) -> tuple:
    if tokens >= 4096:
        return ">= 80% copy bw, >= 1.5x eager", lambda r: (
            r["pct_copy_bw"] >= 80 and r["speedup_vs_naive"] != "" and r["speedup_vs_naive"] >= 1.5)
    return ">= 1.5x eager", lambda r: r["speedup_vs_naive"] != "" and r["speedup_vs_naive"] >= 1.5


def bench_rmsnorm(rec: Recorder, shape: Shape, tokens_list, compiled_ok: bool) -> None:
    from minimoe.kernels.rmsnorm import rms_norm

    device = rec.device
    norm = RMSNorm(shape.hidden).to(device)
    notes: list = []
    compiled = _compiled(norm.forward, notes) if compiled_ok else None
    for tokens in tokens_list:
        x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
        where = dict(kernel="rmsnorm", model=shape.name, tokens=tokens, routing="-",
                     graph=tokens <= GRAPH_TOKENS)
        start = len(rec.rows)
        with torch.no_grad():
            rec.time(lambda: norm(x), impl="naive", **where)
            if compiled is not None:
                rec.time(lambda: compiled(x), impl="torch.compile", **where)
            rec.time(lambda: rms_norm(x, norm.weight, norm.eps), impl="triton", **where)
        target, judge = _bandwidth_target(tokens)
        rec.finish_group(start, 0.0, 4 * tokens * shape.hidden + 4 * shape.hidden, target, judge)


def bench_rope(rec: Recorder, shape: Shape, tokens_list, compiled_ok: bool) -> None:
    from minimoe.kernels.rope import apply_rotary

    device = rec.device
    notes: list = []
    compiled = _compiled(rope_reference, notes) if compiled_ok else None
    for tokens in tokens_list:
        x = torch.randn(1, shape.rope_heads, tokens, shape.head_dim, device=device,
                        dtype=torch.bfloat16)  # (1, H, T, D)
        angle = torch.rand(tokens, shape.rotary_dim, device=device)  # (T, rotary_dim)
        cos, sin = angle.cos(), angle.sin()
        where = dict(kernel="rope", model=shape.name, tokens=tokens, routing="-",
                     graph=tokens <= GRAPH_TOKENS)
        start = len(rec.rows)
        with torch.no_grad():
            rec.time(lambda: rope_reference(x, cos, sin), impl="naive", **where)
            if compiled is not None:
                rec.time(lambda: compiled(x, cos, sin), impl="torch.compile", **where)
            rec.time(lambda: apply_rotary(x, cos, sin), impl="triton", **where)
        target, judge = _bandwidth_target(tokens)
        rec.finish_group(start, 0.0, 4 * x.numel() + 8 * tokens * shape.rotary_dim, target, judge)


def _moe_target(tokens: int) -> tuple:
    if tokens >= 16384:
        return ">= 60% peak, >= 0.9x grouped_mm", lambda r: (
            r["pct_peak_flops"] >= 60 and r["speedup_vs_best"] != "" and r["speedup_vs_best"] >= 0.9)
    if tokens <= 1024:
        return ">= 70% copy bw (touched weights)", lambda r: r["pct_copy_bw"] >= 70
    return "", None


def bench_moe(rec: Recorder, shape: Shape, tokens_list, fused_moe, routings) -> None:
    device = rec.device
    experts = make_experts(shape, device, torch.bfloat16)
    params = [experts.gate_proj, experts.up_proj, experts.down_proj]
    grouped = grouped_mm_backend(device, torch.bfloat16, shape.hidden, shape.ffn)
    weight_bytes_per_expert = 3 * shape.ffn * shape.hidden * 2
    # the naive backward writes a full-size (E, I, C) gradient per expert: only where it is small
    naive_backward = shape.experts * weight_bytes_per_expert < 4e9
    for routing in routings:
        for tokens in tokens_list:
            gen = torch.Generator().manual_seed(tokens)
            idx, weight = make_routing(tokens, shape, routing, device, generator=gen)
            x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
            touched = int(torch.unique(idx).numel())
            flops = 6 * tokens * shape.top_k * shape.hidden * shape.ffn
            bytes_fwd = touched * weight_bytes_per_expert + tokens * shape.hidden * (2 + 4)
            contenders = {"naive": lambda x_, w_: dispatch_naive(x_, idx, w_, experts),
                          f"sorted+{grouped}": lambda x_, w_: dispatch_sorted(
                              x_, idx, w_, experts, backend=grouped)}
            if fused_moe is not None:
                contenders["triton"] = lambda x_, w_: fused_moe(x_, idx, w_, *params)

            where = dict(kernel="moe_fwd", model=shape.name, tokens=tokens, routing=routing)
            start = len(rec.rows)
            forward_ms = {}
            with torch.no_grad():
                for impl, fn in contenders.items():
                    forward_ms[impl] = rec.time(lambda: fn(x, weight), impl=impl, **where)
            target, judge = _moe_target(tokens)
            rec.finish_group(start, flops, bytes_fwd, target, judge)

            # backward = (forward + backward) - forward; weights read again, gradients written
            where = dict(kernel="moe_bwd", model=shape.name, tokens=tokens, routing=routing)
            start = len(rec.rows)
            x_grad = x.clone().requires_grad_()
            w_grad = weight.clone().requires_grad_()
            grad_out = torch.randn(tokens, shape.hidden, device=device)  # float32, as the output
            for impl, fn in contenders.items():
                if forward_ms.get(impl) is None or (impl == "naive" and not naive_backward):
                    continue

                def step(fn=fn):
                    fn(x_grad, w_grad).backward(grad_out)

                _time_backward(rec, step, forward_ms[impl], impl, where, x_grad, w_grad, *params)
            rec.finish_group(start, 2 * flops, 2 * bytes_fwd)
    del experts, params
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_backward(rec, step, forward_ms, impl, where, *tensors) -> None:
    def run():
        for t in tensors:
            t.grad = None
        step()

    try:
        total = time_ms(run, rec.device, rec.quick)
    except torch.cuda.OutOfMemoryError:
        rec.rows.append(_row(section="timing", impl=impl, **where, note="out of memory"))
        return
    except Exception as error:
        rec.rows.append(_row(section="timing", impl=impl, **where,
                             note=f"{type(error).__name__}: {str(error)[:100]}"))
        return
    finally:  # free the gradients (the experts' are as large as the weights)
        for t in tensors:
            t.grad = None
        if rec.device.type == "cuda":
            torch.cuda.empty_cache()
    rec.rows.append(_row(section="timing", impl=impl, **where,
                         median_us=_sig(max(total - forward_ms, 1e-6) * 1e3, 4),
                         note="(forward+backward) - forward"))


def gpu_rows(args, device) -> tuple[list, dict]:
    peaks = measure_device(device, args.quick)
    print(f"device: {torch.cuda.get_device_name(device)}; measured bf16 matmul peak "
          f"{peaks['peak_tflops']:.0f} TFLOP/s, copy bandwidth {peaks['copy_gbps']:.0f} GB/s")
    rows = [_row(section="device", kernel="bf16 matmul 8192^3", impl="torch",
                 tflops=round(peaks["peak_tflops"], 1), note="the peak every % refers to"),
            _row(section="device", kernel="copy 512 MiB", impl="torch",
                 gbps=round(peaks["copy_gbps"], 1), note="read + write")]
    rows += correctness_rows(device)
    rec = Recorder(device, peaks, args.quick)
    tokens = TOKENS_QUICK if args.quick else TOKENS
    fused_moe, reason = fused_moe_or_reason()
    if reason:
        print(reason + ": the fused MoE rows are left out")
    bar = progress(len(MODELS), "kernels", unit="model shape")
    for model in MODELS:
        bar.update(1)
        shape = shape_of(model)
        bench_router(rec, shape, tokens, not args.no_compile)
        bench_rmsnorm(rec, shape, tokens, not args.no_compile)
        bench_rope(rec, shape, tokens, not args.no_compile)
        bench_moe(rec, shape, tokens, fused_moe, ("uniform",) if args.quick else ("uniform", "zipf"))
    bar.close()
    return rows + rec.rows, peaks


# ----------------------------------------------------------------------------------------------
# Without a GPU
# ----------------------------------------------------------------------------------------------
def cpu_reference_rows(quick: bool) -> list:
    """The reference code timed on the CPU at tiny sizes (no kernels: no interpreter)."""
    device = torch.device("cpu")
    rows = []
    shape = Shape("tiny", 256, 128, 16, 2, 4, 2, "sigmoid", True, 2.5, 4, 64, 32)
    logits = torch.randn(256, 64)
    router_shape = Shape("tiny", 256, 128, 64, 6, 8, 3, "sigmoid", True, 2.5, 4, 64, 32)
    bias = torch.randn(64) * 0.1
    norm = RMSNorm(256)
    x = torch.randn(256, 256)
    xr = torch.randn(1, 4, 256, 64)
    angle = torch.rand(256, 32)
    cos, sin = angle.cos(), angle.sin()
    experts = make_experts(shape, device, torch.float32)
    idx, weight = make_routing(64, shape, "uniform", device)
    xm = torch.randn(64, 256)
    cases = [
        ("router", "N256 E64 k6", "naive", lambda: reference_route(logits, bias, router_shape)),
        ("rmsnorm", "(256, 256)", "naive", lambda: norm(x)),
        ("rope", "(1, 4, 256, 64)", "naive", lambda: rope_reference(xr, cos, sin)),
        ("moe_fwd", "N64 C256 I128 E16 k2", "naive", lambda: dispatch_naive(xm, idx, weight, experts)),
        ("moe_fwd", "N64 C256 I128 E16 k2", "sorted", lambda: dispatch_sorted(xm, idx, weight, experts)),
    ]
    bar = progress(len(cases), "kernels (CPU reference)", unit="case")
    with torch.no_grad():
        for kernel, model, impl, fn in cases:
            bar.update(1)
            ms = time_ms(fn, device, quick)
            rows.append(_row(section="timing", kernel=kernel, model=model, tokens="", routing="-",
                             impl=impl, median_us=round(ms * 1e3, 1), note="CPU, reference only"))
    bar.close()
    return rows


def cpu_rows(args) -> list:
    print("no CUDA GPU (torch.cuda.is_available() is False): the GPU benchmarks are skipped; "
          "checking correctness only.")
    try:
        from minimoe.kernel_switch import triton_interpreted

        interpreted = triton_interpreted()
    except ImportError:
        print("the triton package is not installed: the kernels cannot run here.")
        interpreted = False
    if interpreted:
        print("TRITON_INTERPRET=1: each kernel against its reference on small CPU shapes.")
        return correctness_rows(torch.device("cpu"))
    print("The Triton interpreter is needed to run the kernels on the CPU (start Python with "
          "TRITON_INTERPRET=1). Timing the reference code on the CPU at tiny sizes instead.")
    return cpu_reference_rows(args.quick)


# ----------------------------------------------------------------------------------------------
# Output: csv, markdown, figures
# ----------------------------------------------------------------------------------------------
def markdown_table(rows: list) -> str:
    shown = ["section", "kernel", "model", "tokens", "routing", "impl", "median_us", "tflops",
             "gbps", "pct_peak_flops", "pct_copy_bw", "speedup_vs_naive", "speedup_vs_best",
             "target", "target_met", "max_abs_err", "passed", "note"]
    used = [c for c in shown if any(str(r.get(c, "")) != "" for r in rows)]
    lines = ["| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in used) + " |")
    return "\n".join(lines)


def write_csv(rows: list, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot_figures(rows: list, peaks: dict, figures_dir: Path) -> list:
    """Roofline of the MoE rows and speed-up of the Triton kernels; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["section"] == "timing" and r["median_us"] != ""]
    written = []

    # roofline: achieved TFLOP/s vs FLOP/byte for the MoE forward, under measured ceilings
    moe = [r for r in timed if r["kernel"] == "moe_fwd" and r["tflops"] != ""]
    if moe:
        fig, ax = plt.subplots(figsize=(7, 5))
        grid = [10 ** (e / 20) for e in range(-20, 81)]
        ax.plot(grid, [min(peaks["peak_tflops"], peaks["copy_gbps"] * i / 1e3) for i in grid],
                color="black", label="measured roofline")
        for impl, marker in (("triton", "o"), ("naive", "x")):
            points = [r for r in moe if r["impl"] == impl]
            if points:
                ax.scatter([r["flops"] / r["bytes"] for r in points], [r["tflops"] for r in points], marker=marker, label=impl)
        points = [r for r in moe if r["impl"].startswith("sorted")]
        if points:
            ax.scatter([r["flops"] / r["bytes"] for r in points], [r["tflops"] for r in points],
                       marker="s", label=points[0]["impl"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP per byte of touched weights + activations)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title("MoE experts forward (bf16): roofline of this GPU")
        ax.legend()
        path = figures_dir / "kernels_roofline.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    # speed-up of the Triton kernel over the naive reference, per kernel and model
    kernels = [k for k in ("router", "rmsnorm", "rope", "moe_fwd", "moe_bwd")
               if any(r["kernel"] == k and r["impl"] == "triton" for r in timed)]
    if kernels:
        fig, axes = plt.subplots(1, len(kernels), figsize=(4 * len(kernels), 3.6), squeeze=False)
        for ax, kernel in zip(axes[0], kernels):
            for model in dict.fromkeys(r["model"] for r in timed):  # in order of appearance
                for routing in ("-", "uniform", "zipf"):
                    points = [r for r in timed if r["kernel"] == kernel and r["model"] == model
                              and r["routing"] == routing and r["impl"] == "triton"]
                    for column, style in (("speedup_vs_naive", "-o"), ("speedup_vs_best", "--s")):
                        pts = [r for r in points if r[column] != ""]
                        if pts:
                            label = f"{model}{'' if routing == '-' else ' ' + routing} " \
                                    f"{'vs naive' if column == 'speedup_vs_naive' else 'vs best'}"
                            ax.plot([r["tokens"] for r in pts], [r[column] for r in pts], style,
                                    label=label, markersize=3)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xscale("log", base=4)
            ax.set_yscale("log")
            ax.set_title(kernel)
            ax.set_xlabel("tokens")
        axes[0][0].set_ylabel("speed-up of the Triton kernel")
        axes[0][-1].legend(fontsize=6)
        path = figures_dir / "kernels_speedup.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def print_target_summary(rows: list) -> None:
    """How many speed targets were met; one line per missed target."""
    judged = [r for r in rows if r.get("target_met") in ("yes", "NO")]
    if not judged:
        return
    missed = [r for r in judged if r["target_met"] == "NO"]
    print(f"speed targets met: {len(judged) - len(missed)} of {len(judged)}")
    for r in missed:
        print(f"  missed: {r['kernel']} {r['model']} {r['tokens']} tokens {r['routing']}: "
              f"{r['median_us']} us, {r['pct_peak_flops'] or '-'}% peak, "
              f"{r['pct_copy_bw']}% copy bw, x{r['speedup_vs_naive'] or '-'} vs naive, "
              f"x{r['speedup_vs_best'] or '-'} vs best (target {r['target']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer token counts and repeats")
    parser.add_argument("--out", type=Path, default=None,
                        help="one folder for csv, markdown and figures (default: "
                             "runs/bench/kernels)")
    parser.add_argument("--publish", action="store_true", help="write the committed copies: "
                        "notebooks/results and figures/ of the repository")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    args = parser.parse_args(argv)
    default = Path(results_dir("kernels"))
    tables_dir = args.out or (REPO / "notebooks" / "results" if args.publish else default)
    figures_dir = args.out or (REPO / "figures" if args.publish else default)
    tables_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        from minimoe.kernel_switch import triton_interpreted

        on_gpu = not triton_interpreted()
        if not on_gpu:
            print("TRITON_INTERPRET=1 is set: the kernels run on the CPU; no GPU timings.")
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if on_gpu:
        device = torch.device("cuda")
        rows, peaks = gpu_rows(args, device)
        stem = "kernels_bench"
    else:
        rows, peaks = cpu_rows(args), None
        stem = "kernels_bench_cpu"

    table = markdown_table(rows)
    print(table)
    write_csv(rows, tables_dir / f"{stem}.csv")
    header = "# Kernel benchmarks\n\n"
    if peaks:
        header += (f"Device: {torch.cuda.get_device_name()}; measured bf16 matmul peak "
                   f"{peaks['peak_tflops']:.0f} TFLOP/s, copy bandwidth {peaks['copy_gbps']:.0f} GB/s; "
                   f"torch {torch.__version__}.\n\n")
    else:
        header += "No CUDA GPU: correctness (or CPU reference timings) only.\n\n"
    (tables_dir / f"{stem}.md").write_text(header + table + "\n")
    written = [tables_dir / f"{stem}.csv", tables_dir / f"{stem}.md"]
    if peaks:
        try:
            written += plot_figures(rows, peaks, figures_dir)
        except ImportError as error:  # a GPU image without matplotlib: the csv has everything
            print(f"no figures ({error}); plot them later from {stem}.csv")
    print("wrote " + ", ".join(str(p) for p in written))
    print_target_summary(rows)
    failed = [r for r in rows if r["section"] == "correctness" and r["passed"] is False]
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED: " + ", ".join(r["kernel"] for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
