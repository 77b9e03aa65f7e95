"""Benchmark: what the NaN / inf check costs when a checkpoint is loaded.

    python -m minimoe.bench.checkpoint_load                # ~1.3 GB float32 checkpoint
    python -m minimoe.bench.checkpoint_load --hidden-size 512 --layers 4

Writes a random DeepSeek-V3-layout checkpoint into a temporary folder, then times
``load_pretrained`` with the check (``minimoe.checkpoints.shards.all_finite`` on every floating
tensor read) and without it (the function replaced by one that accepts everything),
alternately, ``--repeats`` times each. The files are in the page cache after the first load,
so both columns measure the same warm reads, where the check's share is as large as it gets
(from a cold disk the reading dominates even more). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from minimoe.checkpoints import shards
from minimoe.checkpoints.export import save_pretrained
from minimoe.checkpoints.load import load_pretrained
from minimoe.config import ModelConfig
from minimoe.model import Transformer


def timed_load(folder: str, check: bool) -> float:
    """Seconds of one load_pretrained, with or without the finiteness check."""
    real = shards.all_finite
    if not check:
        shards.all_finite = lambda tensor: True
    try:
        started = time.perf_counter()
        load_pretrained(folder)
        return time.perf_counter() - started
    finally:
        shards.all_finite = real


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args(argv)
    C = options.hidden_size
    cfg = ModelConfig.preset("toy", hidden_size=C, num_hidden_layers=options.layers,
                             num_attention_heads=8, intermediate_size=3 * C,
                             n_routed_experts=options.experts, moe_intermediate_size=C // 2,
                             q_lora_rank=C // 2, kv_lora_rank=C // 4, vocab_size=32000,
                             num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, max_shard_size="200MB")
        del model
        timed_load(folder, True)  # warm the page cache
        times = {True: [], False: []}
        for _ in range(options.repeats):
            for check in (True, False):
                times[check].append(timed_load(folder, check))
    with_check, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"checkpoint: {n_bytes / 1e9:.2f} GB float32 (hidden {C}, {options.layers} layers, "
          f"{options.experts} experts), warm page cache")
    print(f"| load_pretrained | seconds (median of {options.repeats}) |")
    print("|---|---|")
    print(f"| without the NaN/inf check | {without:.3f} |")
    print(f"| with the check | {with_check:.3f} |")
    print(f"| the check's share | {100 * (with_check - without) / with_check:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
