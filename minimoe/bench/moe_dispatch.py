"""Benchmark: naive per-expert loop vs sort-based grouped dispatch, forward + backward.

What is measured
----------------
One ``minimoe.moe.MoE`` layer -- router, 64 routed experts, top-6, hidden size 512, no
shared expert (it would add the same time to both columns) -- on 8192 tokens, forward
and backward, once with ``cfg.dispatch = "naive"`` and once with ``"sorted"``. The two
layers hold the same weights, and the router (freshly initialised) spreads the tokens
roughly evenly, about N * k / E = 768 rows per expert. Expert width (moe_intermediate_size)
256 and 1024. One warm-up run per layer, then ``--repeats`` runs of each, interleaved
(naive, sorted, naive, ...) so that a slow spell of the machine hits both; the table shows
the medians.

How to read it
--------------
Both paths do the same floating-point work: 3 matmuls of 2 * M * C * I flops forward and
6 backward, M = N * k slots. At matmul speed S (GFLOP/s) that alone takes
9 * 2 * M * C * I / S, so the speed-up of the sorted path is bounded by how much
overhead the naive loop adds on top of the arithmetic. The table prints that lower bound
("matmul floor", from one large square matmul on this machine; the (768 x 512) blocks of
an expert run 10-20% slower than that) so the reader can see how close each path gets.
The naive loop loses in backward above all: indexing the stacked weights per expert
(``gate_proj[e]``) makes autograd write a full-size (E, I, C) gradient for each expert,
and each ``x[token]`` gather a full (N, C) one; on a CPU those fresh buffers also cost
page faults. The script prints the load average before and after: the machine must be
otherwise idle, or the numbers mean little (an OpenMP thread that loses its core makes
every parallel region wait).

    python -m minimoe.bench.moe_dispatch                 # float32, the defaults below
    python -m minimoe.bench.moe_dispatch --dtype bfloat16 --tokens 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from minimoe.bench import progress
from minimoe.config import ModelConfig
from minimoe.moe import MoE, grouped_mm_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def layer_config(hidden: int, ffn: int, experts: int, top_k: int, dispatch: str) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden, num_attention_heads=8, attention="mha", q_lora_rank=None,
        n_routed_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn,
        n_shared_experts=0, scoring_func="softmax", topk_method="greedy", n_group=1,
        topk_group=1, norm_topk_prob=False, use_expert_bias=False, dispatch=dispatch,
    )


def time_step(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward + backward of the layer."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    y, _ = layer(x)
    y.backward(grad)
    return time.perf_counter() - start


def matmul_speed(dtype: torch.dtype, size: int = 2048) -> float:
    """GFLOP/s of one large square matmul (the arithmetic ceiling of this machine)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        runs.append(time.perf_counter() - start)
    return 2 * size**3 / min(runs) / 1e9


def bench_one(ffn: int, args, dtype: torch.dtype, speed: float) -> dict:
    torch.manual_seed(0)
    naive = MoE(layer_config(args.hidden, ffn, args.experts, args.top_k, "naive")).to(dtype)
    sorted_ = MoE(layer_config(args.hidden, ffn, args.experts, args.top_k, "sorted")).to(dtype)
    sorted_.load_state_dict(naive.state_dict())
    x = torch.randn(1, args.tokens, args.hidden, dtype=dtype, requires_grad=True)  # (B, T, C)
    grad = torch.randn(1, args.tokens, args.hidden, dtype=dtype)  # (B, T, C)

    time_step(naive, x, grad)  # warm-up
    time_step(sorted_, x, grad)
    naive_runs, sorted_runs = [], []
    for _ in range(args.repeats):
        naive_runs.append(time_step(naive, x, grad))
        sorted_runs.append(time_step(sorted_, x, grad))
    slots = args.tokens * args.top_k
    floor = 9 * 2 * slots * args.hidden * ffn / (speed * 1e9)  # seconds of pure matmul
    return {
        "ffn": ffn,
        "naive_ms": 1e3 * statistics.median(naive_runs),
        "sorted_ms": 1e3 * statistics.median(sorted_runs),
        "floor_ms": 1e3 * floor,
        "backend": grouped_mm_backend(x.device, dtype, args.hidden, ffn),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--ffn", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()[0]
    speed = matmul_speed(dtype)
    print(f"MoE layer forward+backward: {args.tokens} tokens, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.top_k}, {args.dtype}, {torch.get_num_threads()} "
          f"threads, median of {args.repeats} (torch {torch.__version__}; large {args.dtype} "
          f"matmul {speed:.0f} GFLOP/s)")
    print()
    print("| expert FFN | naive loop (ms) | sorted (ms) | speed-up | matmul floor (ms) "
          "| grouped-matmul backend |")
    print("|---:|---:|---:|---:|---:|:---|")
    bar = progress(len(args.ffn), "moe_dispatch", unit="width")
    for ffn in args.ffn:
        r = bench_one(ffn, args, dtype, speed)
        bar.update(1)
        bar.write(f"| {r['ffn']} | {r['naive_ms']:.0f} | {r['sorted_ms']:.0f} | "
              f"{r['naive_ms'] / r['sorted_ms']:.2f}x | {r['floor_ms']:.0f} | {r['backend']} |")
    bar.close()
    print()
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
