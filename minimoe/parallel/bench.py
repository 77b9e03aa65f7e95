"""Benchmark: the expert-parallel layer's forward + backward, and the all-to-all's share.

    python -m minimoe.parallel.bench            # 2 and 4 ranks, gloo on this CPU

Every rank runs ``ExpertParallelMoE`` forward + backward on its own tokens; the all-to-alls
(counts, dispatch, combine, and the two in backward) are timed from inside
(``expert_parallel.CommTimer``). The same layer in one process on all ranks' tokens is the
baseline, measured in the same run.

Read the numbers for what they are. On one CPU the "ranks" are processes sharing the same
cores and memory: 4 processes on 2 cores take turns, and an all-to-all is a copy through
shared memory plus gloo's synchronisation, which mostly measures how long a rank waits for
the slowest one. This shows the data flow and its bookkeeping cost, not a speed-up. What
the links of a real cluster would take is ``minimoe.parallel.comm``'s arithmetic: e.g.
DeepSeek-V3's dispatch + combine of 4096 tokens per GPU and layer take ~6-8 ms of IB
bandwidth, comparable to the layer's expert compute -- the 1:1 ratio that §3.2.1 of the
report says DualPipe was built to hide.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minimoe.config import ModelConfig
from minimoe.moe import MoE


def bench_config(hidden: int, experts: int, top_k: int, width: int) -> ModelConfig:
    return ModelConfig.preset("toy", hidden_size=hidden, n_routed_experts=experts,
                              num_experts_per_tok=top_k, moe_intermediate_size=width,
                              n_group=1, topk_group=1, topk_method="greedy",
                              seq_aux_loss_alpha=0.0)


def time_step(layer, x: torch.Tensor, grad: torch.Tensor) -> float:
    started = time.perf_counter()
    y, _ = layer(x)
    y.backward(grad)
    return time.perf_counter() - started


def _worker(rank: int, world: int, init_file: str, result_path: str, options: dict) -> None:
    from minimoe.parallel import expert_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = bench_config(options["hidden"], options["experts"], options["top_k"], options["width"])
    torch.manual_seed(0)
    layer = expert_parallel.shard_moe(MoE(cfg).train())
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1, options["tokens"], cfg.hidden_size, generator=gen)  # (1, N, C)
    grad = torch.randn(x.shape, generator=gen)
    for _ in range(options["warmup"]):
        time_step(layer, x, grad)
    totals, comms, sent = [], [], []
    for _ in range(options["repeats"]):
        expert_parallel.comm_timer = expert_parallel.CommTimer()
        dist.barrier()
        totals.append(time_step(layer, x, grad))
        comms.append(expert_parallel.comm_timer.seconds)
        sent.append(expert_parallel.comm_timer.bytes_sent)
    expert_parallel.comm_timer = None
    # the step ends when the slowest rank ends: report the max over ranks of each median
    stats = torch.tensor([statistics.median(totals), statistics.median(comms), sent[-1]],
                         dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    if rank == 0:
        with open(result_path, "w") as handle:
            json.dump({"step_s": float(stats[0]), "comm_s": float(stats[1]),
                       "bytes_sent": float(stats[2])}, handle)


def run_ranks(world: int, options: dict) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "result.json")
        mp.spawn(_worker, args=(world, os.path.join(folder, "rendezvous"), result_path, options),
                 nprocs=world, join=True)
        with open(result_path) as handle:
            return json.load(handle)


def run_single(world: int, options: dict) -> float:
    """The single-process layer on all ranks' tokens, one thread: median seconds."""
    torch.set_num_threads(1)
    cfg = bench_config(options["hidden"], options["experts"], options["top_k"], options["width"])
    torch.manual_seed(0)
    layer = MoE(cfg).train()
    x = torch.randn(1, world * options["tokens"], cfg.hidden_size)
    grad = torch.randn(x.shape)
    for _ in range(options["warmup"]):
        time_step(layer, x, grad)
    return statistics.median(time_step(layer, x, grad) for _ in range(options["repeats"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--width", type=int, default=256, help="expert intermediate size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    options = vars(parser.parse_args(argv))
    print(f"expert-parallel MoE layer, forward + backward, float32, gloo on CPU "
          f"({os.cpu_count()} cores, one thread per process); C={options['hidden']}, "
          f"E={options['experts']}, top-{options['top_k']}, I={options['width']}, "
          f"{options['tokens']} tokens per rank")
    print(f"{'ranks':>5}{'step ms':>10}{'all-to-all ms':>15}{'share':>8}{'MB sent/rank fwd':>18}"
          f"{'1 process, same tokens ms':>27}")
    for world in options["ranks"]:
        result = run_ranks(world, options)
        single = run_single(world, options)
        print(f"{world:>5}{result['step_s'] * 1e3:>10.1f}{result['comm_s'] * 1e3:>15.1f}"
              f"{result['comm_s'] / result['step_s']:>8.0%}{result['bytes_sent'] / 1e6:>18.2f}"
              f"{single * 1e3:>27.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
