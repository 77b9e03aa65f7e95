"""Benchmark: the FP8 kernels (act_quant, weight_dequant, fp8_gemm) on one GPU, or their
correctness and the cost of the FP8 emulation on a CPU.

    python -m minimoe.bench.fp8_kernels                 # GPU: full table; CPU: see below
    python -m minimoe.bench.fp8_kernels --quick         # fewer repeats
    python -m minimoe.bench.fp8_kernels --out DIR       # where the csv / markdown go
                                                        # (default runs/bench/fp8_kernels)

What is measured on a CUDA GPU
------------------------------
1. The device itself, in the same run: copy bandwidth (one 1 GiB tensor copy, GB/s counting
   read + write) and the bf16 matmul peak (one 8192^3 bf16 matmul, TFLOP/s). Every result
   is also given as a percentage of these, never of a number from another machine.
2. ``act_quant`` (1x128 tiles, bf16 in) at M = 4096 and 16384 tokens, K = 7168, and
   ``weight_dequant`` (128x128 blocks, bf16 out) on DeepSeek-V3 weight shapes. Both are
   memory-bound: GB/s = (bytes read + bytes written, scales included) / time, and % of the
   copy bandwidth:

       act_quant       M K * 2 (bf16 read) + M K (e4m3 write) + M ceil(K/128) * 4 (scales)
       weight_dequant  N K (e4m3 read) + ceil(N/128) ceil(K/128) * 4 + N K * 2 (bf16 write)

3. ``fp8_gemm`` (1x128 x 128x128 block scales, promotion every 128, float32 out) at the
   DeepSeek-V3 shapes (N, K) = (2112, 7168) [MLA's fused q_a + kv_a projection],
   (7168, 2048) [an expert's down projection / o_proj-like], (4096, 7168) [an expert pair's
   gate+up], each for M = 128 (decode-like) and 4096 tokens: TFLOP/s = 2 M N K / time, % of
   the bf16 peak, and the ratio to torch's own block-scaled FP8 GEMM
   (``torch._scaled_mm`` with 1x128 / 128x128 float32 scales, bf16 out) where this torch
   build and GPU support it (the script tries it, checks its result against the reference
   and says why when it cannot). Also, for scale, the emulation the CPU path uses
   (dequantise both operands, float32 matmul) on the same GPU.
   FP8 tensor cores need compute capability 8.9 (Ada) or 9.0+ (Hopper); below that the GEMM
   rows say so.

Each time is the median of ``triton.testing.do_bench`` (L2 flushed before every run).

What happens without a GPU
--------------------------
Correctness only, plus the cost of the emulation: with ``TRITON_INTERPRET=1`` set before
Python starts, each kernel is run on small CPU shapes through Triton's interpreter and
compared with ``minimoe.fp8``; without it, the reference quantisers are checked against a
direct formula. Then the simulated FP8 linear layer and the FP8 grouped expert product
(forward + backward) are timed against the same products in bf16 (``torch.autocast``) and
float32: that ratio is what the FP8 twin of ``minimoe.experiments.fp8_training`` pays per
step on a CPU. The CPU table goes to fp8_kernels_bench_cpu.{csv,md}, never over the GPU's.
Exit status 0 unless a correctness check fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from minimoe import fp8
from minimoe.bench import progress

GEMM_SHAPES = [(2112, 7168), (7168, 2048), (4096, 7168)]  # (N, K), DeepSeek-V3
GEMM_TOKENS = [128, 4096]
QUANT_TOKENS = [4096, 16384]
QUANT_K = 7168
DEQUANT_SHAPES = [(7168, 2048), (4096, 7168), (18432, 7168)]
DEFAULT_OUT = Path("runs") / "bench" / "fp8_kernels"  # --publish: notebooks/results


# ----------------------------------------------------------------------------- GPU measurements
def _do_bench(fn: Callable[[], object], quick: bool) -> float:
    """Median milliseconds of fn on the GPU (triton.testing.do_bench flushes L2 each run)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10 if quick else 25,
                                         rep=40 if quick else 100, return_mode="median"))


def measure_device(device, quick: bool) -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul peak (TFLOP/s), this run."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = _do_bench(lambda: dst.copy_(src), quick)
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = _do_bench(lambda: a @ b, quick)
    return {"copy_GBps": 2 * 2 ** 30 / copy_ms / 1e6, "bf16_TFLOPs": 2 * n ** 3 / mm_ms / 1e9}


def scaled_mm_or_reason(a_q, a_s, w_q, w_s, reference: torch.Tensor):
    """A callable running torch._scaled_mm with block scales, or the reason it cannot.

    torch._scaled_mm(a (M, K) row-major, b (K, N) column-major, scale_a, scale_b) supports
    1x128 (a) x 128x128 (b) float32 block scales on Hopper in recent builds; the scale
    layouts it accepts have changed between versions, so a few are tried and each result is
    compared with the reference before it counts.
    """
    if not hasattr(torch, "_scaled_mm"):
        return None, "this torch has no torch._scaled_mm"
    b = w_q.t()  # (K, N) column-major view of the row-major (N, K) weight
    layouts = {
        "scales as stored": (a_s, w_s.t()),
        "outer-dim-major scales": (a_s.t().contiguous().t(), w_s.t().contiguous()),
        "contiguous transposed scales": (a_s.contiguous(), w_s.t().contiguous().t()),
    }
    errors = []
    for name, (scale_a, scale_b) in layouts.items():
        try:
            def run(scale_a=scale_a, scale_b=scale_b):
                return torch._scaled_mm(a_q, b, scale_a=scale_a, scale_b=scale_b,
                                        out_dtype=torch.bfloat16)

            y = run().float()
            torch.cuda.synchronize()
            err = ((y - reference).norm() / reference.norm()).item()
            if err < 1e-2:
                return run, f"torch._scaled_mm ({name})"
            errors.append(f"{name}: relative error {err:.2g}")
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
            errors.append(f"{name}: {str(error).splitlines()[0][:100]}")
    return None, "torch._scaled_mm with block scales unavailable (" + "; ".join(errors) + ")"


def gpu_rows(quick: bool) -> tuple[list, dict]:
    from minimoe.kernels.fp8_gemm import fp8_gemm
    from minimoe.kernels.fp8_quant import act_quant, weight_dequant

    device = torch.device("cuda")
    peaks = measure_device(device, quick)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    bar = progress(len(QUANT_TOKENS) + len(DEQUANT_SHAPES) + len(GEMM_SHAPES) * len(GEMM_TOKENS),
                   "fp8_kernels", unit="shape")
    for M in QUANT_TOKENS:
        bar.update(1)
        x = torch.randn(M, QUANT_K, device=device, dtype=torch.bfloat16, generator=gen)
        ms = _do_bench(lambda: act_quant(x), quick)
        moved = M * QUANT_K * 2 + M * QUANT_K + M * -(-QUANT_K // 128) * 4
        rows.append(_row("act_quant", f"M={M} K={QUANT_K} bf16", ms, bytes_moved=moved,
                         peaks=peaks))
    for N, K in DEQUANT_SHAPES:
        bar.update(1)
        w = torch.randn(N, K, device=device, generator=gen) * 0.02
        w_q, w_s = fp8.quantize_weight_128x128(w)
        ms = _do_bench(lambda: weight_dequant(w_q, w_s, dtype=torch.bfloat16), quick)
        moved = N * K + w_s.numel() * 4 + N * K * 2
        rows.append(_row("weight_dequant", f"N={N} K={K} -> bf16", ms, bytes_moved=moved,
                         peaks=peaks))
    major, minor = torch.cuda.get_device_capability()
    for N, K in GEMM_SHAPES:
        w_q, w_s = fp8.quantize_weight_128x128(torch.randn(N, K, device=device, generator=gen) * 0.02)
        for M in GEMM_TOKENS:
            bar.update(1)
            where = f"M={M} N={N} K={K}"
            flops = 2 * M * N * K
            a_q, a_s = act_quant(torch.randn(M, K, device=device, dtype=torch.bfloat16,
                                             generator=gen))
            if (major, minor) < (8, 9):
                rows.append(_row("fp8_gemm", where, None,
                                 note=f"needs FP8 tensor cores (sm89+), this GPU is sm{major}{minor}"))
                continue
            reference = fp8.fp8_matmul_reference(a_q, a_s, w_q, w_s)  # (M, N) float32
            y = fp8_gemm(a_q, a_s, w_q, w_s)
            err = ((y - reference).norm() / reference.norm()).item()
            ms = _do_bench(lambda: fp8_gemm(a_q, a_s, w_q, w_s), quick)
            scaled_mm, how = scaled_mm_or_reason(a_q, a_s, w_q, w_s, reference)
            ratio_note = how
            torch_ms = None
            if scaled_mm is not None:
                torch_ms = _do_bench(scaled_mm, quick)
                ratio_note = f"{torch_ms / ms:.2f}x the speed of {how}"
            rows.append(_row("fp8_gemm", where, ms, flops=flops, peaks=peaks,
                             note=f"rel. err vs reference {err:.1e}; {ratio_note}",
                             torch_ms=torch_ms))
            emu_ms = _do_bench(lambda: fp8.dequantize_act_1x128(a_q, a_s)
                               @ fp8.dequantize_weight_128x128(w_q, w_s).T, quick)
            rows.append(_row("emulation", where, emu_ms, flops=flops, peaks=peaks,
                             note="dequantise both operands + float32 matmul (minimoe.fp8)"))
    bar.close()
    return rows, peaks


def _row(kernel: str, where: str, ms: Optional[float], flops: float = 0.0,
         bytes_moved: float = 0.0, peaks: Optional[dict] = None, note: str = "",
         torch_ms: Optional[float] = None) -> dict:
    row = {"kernel": kernel, "shape": where, "ms": None if ms is None else round(ms, 4),
           "TFLOPs": None, "pct_bf16_peak": None, "GBps": None, "pct_copy_bw": None,
           "torch_ms": None if torch_ms is None else round(torch_ms, 4), "note": note}
    if ms is not None and flops:
        row["TFLOPs"] = round(flops / ms / 1e9, 1)
        if peaks:
            row["pct_bf16_peak"] = round(100 * row["TFLOPs"] / peaks["bf16_TFLOPs"], 1)
    if ms is not None and bytes_moved:
        row["GBps"] = round(bytes_moved / ms / 1e6, 1)
        if peaks:
            row["pct_copy_bw"] = round(100 * row["GBps"] / peaks["copy_GBps"], 1)
    return row


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


# ----------------------------------------------------------------------------- CPU path
def _interpreted() -> bool:
    try:
        from minimoe import kernel_switch

        return kernel_switch.triton_interpreted()
    except ImportError:
        return False


def cpu_correctness_rows() -> list:
    """Kernels vs minimoe.fp8 under the interpreter, else the reference vs a direct formula."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, generator=gen) * torch.logspace(-2, 2, 300)
    w = torch.randn(150, 200, generator=gen) * 0.05
    if _interpreted():
        from minimoe.kernels.fp8_gemm import fp8_gemm
        from minimoe.kernels.fp8_quant import act_quant, weight_dequant

        q, s = act_quant(x)
        q_ref, s_ref = fp8.quantize_act_1x128(x)
        same = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        rows.append(_row("act_quant", "6x300 (interpreter)", None,
                         note="bit-identical to quantize_act_1x128" if same else "MISMATCH"))
        w_q, w_s = fp8.quantize_weight_128x128(w)
        same = torch.equal(weight_dequant(w_q, w_s), fp8.dequantize_weight_128x128(w_q, w_s))
        rows.append(_row("weight_dequant", "150x200 (interpreter)", None,
                         note="identical to dequantize_weight_128x128" if same else "MISMATCH"))
        a_q, a_s = fp8.quantize_act_1x128(torch.randn(20, 200, generator=gen))
        y, y_ref = fp8_gemm(a_q, a_s, w_q, w_s), fp8.fp8_matmul_reference(a_q, a_s, w_q, w_s)
        err = ((y - y_ref).norm() / y_ref.norm()).item()
        rows.append(_row("fp8_gemm", "20x200 @ 150x200 (interpreter)", None,
                         note=f"rel. difference to fp8_matmul_reference {err:.1e}"
                         + ("" if err < 1e-5 else " MISMATCH")))
        return rows
    q, s = fp8.quantize_act_1x128(x)
    amax = torch.nn.functional.pad(x, (0, 84)).view(6, 3, 128).abs().amax(-1)
    ok = torch.allclose(s, amax / 448, rtol=1e-6, atol=0) and float(q.float().abs().max()) <= 448
    rows.append(_row("quantize_act_1x128", "6x300 (reference)", None,
                     note=("scales = tile amax / 448" if ok else "MISMATCH")
                     + "; set TRITON_INTERPRET=1 to check the Triton kernels on the CPU"))
    return rows


def _time_cpu(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def cpu_overhead_rows(quick: bool, tokens: int = 2048) -> list:
    """Forward + backward of FP8-simulated products vs the same in bf16 autocast and float32."""
    repeats = 3 if quick else 7
    rows = []
    gen = torch.Generator().manual_seed(0)
    M, K, N = tokens, 512, 512
    bar = progress(6, "fp8 emulation cost", unit="case")

    def timed(run) -> float:
        bar.update(1)
        return _time_cpu(run, repeats)

    x = torch.randn(M, K, generator=gen)
    grad = torch.randn(M, N, generator=gen)
    linear = torch.nn.Linear(K, N, bias=False)
    layer = fp8.Fp8Linear.from_linear(linear)

    def step(module, autocast: bool):
        def run():
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(xi)
            y.backward(grad.to(y.dtype))
        return run

    times = {"fp32": timed(step(linear, False)), "bf16": timed(step(linear, True)),
             "fp8": timed(step(layer, True))}
    for name, ms in times.items():
        rows.append(_row(f"linear fwd+bwd {name}", f"M={M} K={K} N={N}", ms,
                         note=f"{ms / times['bf16']:.2f}x the bf16 time"))
    # the grouped expert product of the toy's MoE layers: 16 experts, C = 128, I = 64
    E, C, I = 16, 128, 64
    sizes = [M // E] * E
    rows_x = torch.randn(M, C, generator=gen)
    weight = torch.randn(E, I, C, generator=gen) * 0.02
    grad_g = torch.randn(M, I, generator=gen)

    def grouped(kind: str):
        def run():
            r = rows_x.clone().requires_grad_(True)
            w = weight.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind != "fp32"):
                if kind == "fp8":
                    y = fp8.fp8_grouped_linear(r, sizes, w)
                else:
                    rr = r.to(torch.bfloat16) if kind == "bf16" else r
                    ww = w.to(torch.bfloat16) if kind == "bf16" else w
                    y = torch.cat([b @ m.T for b, m in zip(rr.split(sizes), ww.unbind(0))])
            y.backward(grad_g.to(y.dtype))
        return run

    times = {kind: timed(grouped(kind)) for kind in ("fp32", "bf16", "fp8")}
    bar.close()
    for name, ms in times.items():
        rows.append(_row(f"grouped fwd+bwd {name}", f"M={M} E={E} C={C} I={I}", ms,
                         note=f"{ms / times['bf16']:.2f}x the bf16 time"))
    return rows


# ----------------------------------------------------------------------------- output
COLUMNS = ["kernel", "shape", "ms", "TFLOPs", "pct_bf16_peak", "GBps", "pct_copy_bw",
           "torch_ms", "note"]


def markdown_table(rows: list, peaks: Optional[dict] = None, header: str = "") -> str:
    lines = [header + "\n"] if header else []
    if peaks:
        lines.append(f"copy bandwidth {peaks['copy_GBps']:.0f} GB/s, bf16 matmul peak "
                     f"{peaks['bf16_TFLOPs']:.0f} TFLOP/s (measured in this run)\n")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_outputs(rows: list, out_dir: Path, stem: str, peaks: Optional[dict],
                  header: str = "") -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows, peaks, header) + "\n")
    return [str(csv_path), str(md_path)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", default=None, help=f"folder for csv / markdown (default: "
                        f"{DEFAULT_OUT})")
    parser.add_argument("--publish", action="store_true",
                        help="write the committed copies in notebooks/results")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cpu-tokens", type=int, default=2048,
                        help="rows of the CPU emulation-overhead products")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    out_dir = Path(options.out or ("notebooks/results" if options.publish else DEFAULT_OUT))
    if torch.cuda.is_available() and not _interpreted():
        rows, peaks = gpu_rows(options.quick)
        header = (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                  f"triton {_triton_version()}")
        print(markdown_table(rows, peaks, header))
        print("wrote", *write_outputs(rows, out_dir, "fp8_kernels_bench", peaks, header))
        return 0
    print("no CUDA GPU here: correctness of the FP8 kernels / quantisers, and the CPU cost of "
          "the FP8 emulation (forward + backward, median of repeats)")
    rows = cpu_correctness_rows()
    failed = any("MISMATCH" in row["note"] for row in rows)
    rows += cpu_overhead_rows(options.quick, options.cpu_tokens)
    header = (f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}; "
              "times in ms, forward + backward, median")
    print(markdown_table(rows, None, header))
    print("wrote", *write_outputs(rows, out_dir, "fp8_kernels_bench_cpu", None, header))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
