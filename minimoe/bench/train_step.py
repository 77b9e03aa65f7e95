"""Benchmark: tokens per second of one training step (forward + backward + AdamW) of a preset.

    python -m minimoe.bench.train_step                 # toy, fp32 and bf16, both dispatches
    python -m minimoe.bench.train_step --preset toy-gqa --batch-size 32

Prints a markdown table: the median step time over --repeats steps after --warmup steps,
and tokens/s, for each dispatch ("naive" per-expert loop, "sorted" grouped matmul) and dtype
(fp32, or bf16 under autocast). The main job (`minimoe train`) runs the toy preset with the
sorted dispatch in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minimoe.bench import progress
from minimoe.config import ModelConfig
from minimoe.model import Transformer
from minimoe.train import TrainArgs, make_optimizer


def time_train_steps(cfg: ModelConfig, batch_size: int, seq_len: int, dtype: str,
                     warmup: int, repeats: int) -> float:
    """Median seconds of one optimiser step on random byte sequences."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    optimizer = make_optimizer(model, TrainArgs())
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    times = []
    for step in range(warmup + repeats):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(inputs, targets=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_expert_biases()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    tokens = options.batch_size * options.seq_len
    print(f"{options.preset}: batch {options.batch_size} x {options.seq_len} = {tokens} tokens "
          f"per step, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| dispatch | dtype | step (ms) | tokens/s |")
    print("|---|---|---|---|")
    bar = progress(2 * len(options.dtypes), "train_step", unit="case")
    for dispatch in ("naive", "sorted"):
        cfg = ModelConfig.preset(options.preset, dispatch=dispatch)
        for dtype in options.dtypes:
            seconds = time_train_steps(cfg, options.batch_size, options.seq_len, dtype,
                                       options.warmup, options.repeats)
            bar.update(1)
            bar.write(f"| {dispatch} | {dtype} | {1000 * seconds:.1f} | {tokens / seconds:,.0f} |")
    bar.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
