"""Communication arithmetic: the bytes an MoE layer moves per token, and how long they take.

    python -m minimoe.parallel.comm

The numbers (DeepSeek-V3 technical report)
-------------------------------------------
* Cluster (§3.1, §3.2): H800 nodes of 8 GPUs; NVLink 160 GB/s and InfiniBand 50 GB/s per
  GPU (§3.2.2). Training uses 64-way expert parallelism over 8 nodes, so 256 routed experts
  sit 4 per GPU, 32 per node.
* Dispatch precision (§3.3.3, "Low-Precision Storage and Communication"): activations
  before the MoE up-projection are quantised to FP8 for the dispatch, with the 1x128-tile
  scales of §3.3.2, so one token row of width C costs C bytes + 4 bytes per 128 elements (a
  float32 scale) instead of 2C in BF16; the combine stays in BF16.
* Routing (§2.1.2, §3.2.2): top-8 of 256, node-limited to M = 4 nodes.

Per token and MoE layer, with n_IB the token's copies over InfiniBand (distinct remote
nodes among its experts) and n_NV its copies forwarded over NVLink inside nodes
(``minimoe.parallel.node_limited.count_traffic`` counts both on a sampled routing):

    dispatch bytes over IB  = n_IB * C * b_dispatch     b = 2 (BF16) or 1 + 4/128 (FP8)
    combine  bytes over IB  = n_IB * C * 2              (partial sums reduced per node first)
    NVLink bytes            = n_NV * C * (b_dispatch + 2)
    time for T tokens on a GPU = T * bytes / bandwidth of the link

Ling-flash-2.0 is costed on the same cluster (its router has the same 8 groups / 4 kept, so
groups = nodes makes it node-limited too). Latency, protocol overheads and congestion are
left out: these are bandwidth lower bounds, the budget that overlapping (DualPipe) must
hide behind compute.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from minimoe.config import ModelConfig
from minimoe.parallel.node_limited import compare_routing

NVLINK_BYTES_PER_S = 160e9  # per GPU, H800 (DeepSeek-V3 §3.2.2)
IB_BYTES_PER_S = 50e9  # per GPU (DeepSeek-V3 §3.2.2)
FP8_TILE = 128  # one float32 scale per 1x128 activation tile (§3.3.2, §3.3.3)


def bytes_per_element(dispatch: str) -> float:
    """Bytes per activation element on the wire: BF16 2, FP8 1 + 4/128 for the tile scales."""
    if dispatch == "bf16":
        return 2.0
    if dispatch == "fp8":
        return 1.0 + 4.0 / FP8_TILE
    raise ValueError(f"dispatch must be 'bf16' or 'fp8', got {dispatch!r}")


@dataclass
class Cluster:
    ranks: int = 64  # expert-parallel GPUs (DeepSeek-V3 training: EP64)
    ranks_per_node: int = 8
    max_nodes: int = 4  # M of node-limited routing
    tokens_per_gpu: int = 4096  # tokens of one micro-batch on one GPU, for the times


def layer_traffic(cfg: ModelConfig, cluster: Cluster, dispatch: str, copies: dict) -> dict:
    """Bytes per token and microseconds per micro-batch of one MoE layer, given copy counts."""
    C = cfg.hidden_size
    b = bytes_per_element(dispatch)
    ib_dispatch = copies["remote_nodes"] * C * b  # bytes per token
    ib_combine = copies["remote_nodes"] * C * 2.0
    nvlink = copies["nvlink"] * C * (b + 2.0)
    T = cluster.tokens_per_gpu
    return {"ib_dispatch_bytes": ib_dispatch, "ib_combine_bytes": ib_combine,
            "nvlink_bytes": nvlink,
            "ib_us": T * (ib_dispatch + ib_combine) / IB_BYTES_PER_S * 1e6,
            "nvlink_us": T * nvlink / NVLINK_BYTES_PER_S * 1e6}


def comm_table(presets=("deepseek-v3", "ling-flash-2.0"), cluster: Cluster = Cluster()) -> list:
    """One row per (preset, routing, dispatch precision)."""
    rows = []
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        counts = compare_routing(cfg.n_routed_experts, cfg.num_experts_per_tok, cluster.ranks,
                                 cluster.ranks_per_node, cluster.max_nodes)
        for routing, copies in counts.items():
            for dispatch in ("bf16", "fp8"):
                rows.append({"preset": preset, "routing": routing, "dispatch": dispatch,
                             "ib_copies": copies["remote_nodes"],
                             "max_ib_copies": copies["max_remote_nodes"],
                             "nvlink_copies": copies["nvlink"],
                             **layer_traffic(cfg, cluster, dispatch, copies)})
    return rows


def format_table(rows: list, cluster: Cluster = Cluster()) -> str:
    lines = [f"per token and MoE layer; times for {cluster.tokens_per_gpu} tokens per GPU, "
             f"EP{cluster.ranks} on nodes of {cluster.ranks_per_node} GPUs, IB 50 GB/s, "
             f"NVLink 160 GB/s per GPU",
             f"{'preset':<16}{'routing':<14}{'dispatch':<9}{'IB copies':>10}{'(max)':>6}"
             f"{'NVL copies':>11}{'IB KB':>8}{'NVL KB':>8}{'IB us':>8}{'NVL us':>8}"]
    for r in rows:
        ib_kb = (r["ib_dispatch_bytes"] + r["ib_combine_bytes"]) / 1024
        lines.append(f"{r['preset']:<16}{r['routing']:<14}{r['dispatch']:<9}"
                     f"{r['ib_copies']:>10.2f}{r['max_ib_copies']:>6}{r['nvlink_copies']:>11.2f}"
                     f"{ib_kb:>8.1f}{r['nvlink_bytes'] / 1024:>8.1f}"
                     f"{r['ib_us']:>8.0f}{r['nvlink_us']:>8.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Bytes and link times of MoE dispatch/combine.")
    parser.add_argument("--tokens-per-gpu", type=int, default=4096)
    args = parser.parse_args(argv)
    cluster = Cluster(tokens_per_gpu=args.tokens_per_gpu)
    print(format_table(comm_table(cluster=cluster), cluster))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
