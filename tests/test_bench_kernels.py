"""The kernel benchmark suite (minimoe.bench.kernels) on a machine without a GPU.

Its CPU path runs each kernel against its reference through Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported), writes a CSV and a markdown table and
exits 0 (1 when a check fails). The GPU code path (timing rows, derived columns, figures) is run on tiny CPU shapes
with made-up device peaks, so that a GPU run does not meet its first bug on the GPU.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import csv  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("matplotlib")

from minimoe import kernel_switch  # noqa: E402
from minimoe.bench import kernels as bench  # noqa: E402

if not kernel_switch.triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                allow_module_level=True)

EXPECTED_COLUMNS = ["section", "kernel", "model", "tokens", "routing", "impl", "median_us",
                    "flops", "bytes", "tflops", "gbps", "pct_peak_flops", "pct_copy_bw",
                    "speedup_vs_naive", "speedup_vs_best", "target", "target_met",
                    "max_abs_err", "passed", "note"]


def test_quick_cpu_run_checks_every_kernel(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA GPU" in printed and "| correctness | router |" in printed
    with open(tmp_path / "kernels_bench_cpu.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == EXPECTED_COLUMNS
        rows = list(reader)
    assert (tmp_path / "kernels_bench_cpu.md").read_text().startswith("# Kernel benchmarks")
    by_kernel = {row["kernel"]: row for row in rows if row["section"] == "correctness"}
    assert set(by_kernel) == {"router", "rmsnorm", "rope", "moe_fwd+bwd"}
    for name in ("router", "rmsnorm", "rope"):
        assert by_kernel[name]["passed"] == "True", by_kernel[name]
        assert float(by_kernel[name]["max_abs_err"]) < 1e-5
    # minimoe.kernels.fused_moe ships with the project and runs under the interpreter: a row
    # that reports it "unavailable" means the kernel module no longer imports, a failure
    moe = by_kernel["moe_fwd+bwd"]
    assert moe["passed"] == "True", moe
    assert float(moe["max_abs_err"]) < 1e-4, moe


def test_a_failed_correctness_check_is_the_exit_status(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    failing = bench._row(section="correctness", kernel="router", impl="triton", passed=False)
    monkeypatch.setattr(bench, "cpu_rows", lambda args: [failing])
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "1 correctness check(s) FAILED: router" in capsys.readouterr().out


def test_without_the_interpreter_it_times_the_reference(monkeypatch, capsys):
    monkeypatch.setattr(kernel_switch, "triton_interpreted", lambda: False)
    rows = bench.cpu_rows(bench.argparse.Namespace(quick=True))
    assert "interpreter is needed" in capsys.readouterr().out
    assert {row["kernel"] for row in rows} == {"router", "rmsnorm", "rope", "moe_fwd"}
    assert all(row["section"] == "timing" and row["median_us"] > 0 for row in rows)


def test_gpu_code_path_on_tiny_cpu_shapes(tmp_path, capsys):
    shape = bench.Shape("tiny", 64, 32, 16, 4, 4, 2, "sigmoid", True, 2.5, 2, 64, 32)
    peaks = {"peak_tflops": 1.0, "copy_gbps": 10.0}
    rec = bench.Recorder(torch.device("cpu"), peaks, quick=True)
    bench.bench_router(rec, shape, [1, 5], compiled_ok=False)
    bench.bench_rmsnorm(rec, shape, [5], compiled_ok=False)
    bench.bench_rope(rec, shape, [5], compiled_ok=False)
    bench.bench_moe(rec, shape, [5], fused_moe=None, routings=("uniform", "zipf"))
    rows = rec.rows
    assert all(row["median_us"] != "" for row in rows), [r["note"] for r in rows]
    router = [r for r in rows if r["kernel"] == "router" and r["tokens"] == 5]
    naive = next(r for r in router if r["impl"] == "naive")
    triton = next(r for r in router if r["impl"] == "triton")
    # the table keeps 3 significant figures: a relative rounding error of at most 0.5%
    assert triton["speedup_vs_naive"] == pytest.approx(naive["median_us"] / triton["median_us"],
                                                       rel=5e-3)
    assert triton["target_met"] in ("yes", "NO") and naive["target"] == ""
    moe = [r for r in rows if r["kernel"] == "moe_fwd"]
    assert {r["impl"] for r in moe} == {"naive", "sorted+grouped_mm"} or \
        {r["impl"] for r in moe} == {"naive", "sorted+loop"}
    # 3 matmuls of 2 * (N k) * C * I, forward; twice that backward
    assert all(r["flops"] == 6 * 5 * 4 * 64 * 32 for r in moe)
    assert {r["impl"] for r in rows if r["kernel"] == "moe_bwd"} == {r["impl"] for r in moe}
    bench.print_target_summary(rows)
    assert "speed targets met:" in capsys.readouterr().out
    written = bench.plot_figures(rows, peaks, tmp_path)
    assert [p.name for p in written] == ["kernels_roofline.png", "kernels_speedup.png"]


def test_touched_experts_and_arithmetic_intensity():
    # the expected number of touched experts against a simulation of uniform routing
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 4, 32):
        touched = [torch.rand(tokens, 256, generator=gen).topk(8).indices.unique().numel()
                   for _ in range(200)]
        expected = bench.expected_touched_experts(tokens, 256, 8)
        assert sum(touched) / len(touched) == pytest.approx(expected, rel=0.03)
    # one token: each touched bf16 weight (2 bytes) serves one multiply-add (2 FLOPs)
    one = bench.moe_arithmetic_intensity(1, 7168, 2048, 256, 8)
    assert one["touched_experts"] == pytest.approx(8)
    assert one["intensity"] == pytest.approx(1.0, rel=1e-3)
    # many tokens: all 256 experts touched, each weight serves N k / E tokens
    many = bench.moe_arithmetic_intensity(16384, 7168, 2048, 256, 8)
    assert many["touched_experts"] == pytest.approx(256)
    assert many["intensity"] == pytest.approx(16384 * 8 / 256, rel=0.03)
