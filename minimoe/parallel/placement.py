"""Redundant experts: duplicate the hottest experts and place the copies to even out GPUs.

The idea
--------
Even with load balancing, some experts receive more tokens than others, and in expert
parallelism the busiest GPU sets everyone's pace. DeepSeek-V3 serves with *redundant
experts* (technical report §3.4.1): from the load statistics observed online, the
high-load experts are duplicated and the copies deployed on other GPUs -- 32 redundant
experts in the prefill unit of 32 GPUs, each GPU holding its 8 experts plus one copy --
rearranged "based on the observed loads" to balance GPUs without adding cross-node traffic,
and re-chosen periodically (every 10 minutes). A duplicated expert's tokens are split
among its copies.

The problem, with L_e the observed load of expert e (tokens routed to it), G GPUs with
E/G + r slots each (r redundant slots per GPU, R = G r copies in all):

    choose copy counts c_e >= 1 with sum_e c_e = E + R,
    put the E + R copies (each carrying L_e / c_e) into the G GPUs, every slot filled,
    two copies of one expert on different GPUs,
    minimising  max_g  sum_{copies on g} L_e / c_e.

How it is solved here (the two steps of DeepSeek's EPLB, deepseek-ai/EPLB eplb.py:
replicate_experts then balanced_packing):

1. Replication, greedy: R times, give one more copy to the expert with the largest load
   per copy L_e / c_e. This is *optimal* for the load of the heaviest copy,
   min max_e L_e / c_e: the largest per-copy load can only drop by copying the expert that
   has it, and adding copies elsewhere never helps (the tests compare with enumeration).
2. Packing, greedy (longest processing time first): copies in decreasing load, each onto
   the least-loaded GPU that still has a free slot and no copy of the same expert.
   Packing with fixed slot counts is NP-hard; this heuristic is not always optimal. The
   tests compare it with brute force on small cases and bound the gap.

The lower bound max(max_e L_e / c_e, sum L / G) says how good a placement can possibly be.
``placement_report`` gives max / mean GPU load before (experts on GPUs in contiguous
blocks, as expert parallelism places them) and after.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class Placement:
    gpu_experts: list  # per GPU: the expert of every slot
    copies: list  # per expert: number of copies
    gpu_load: list  # per GPU: sum of L_e / c_e over its slots

    @property
    def max_over_mean(self) -> float:
        mean = sum(self.gpu_load) / len(self.gpu_load)
        return max(self.gpu_load) / mean if mean > 0 else 1.0


def _check(load, n_gpus: int, redundant_per_gpu: int) -> list:
    load = [float(x) for x in (load.tolist() if torch.is_tensor(load) else load)]
    if n_gpus < 1 or len(load) % n_gpus:
        raise ValueError(f"{len(load)} experts must split evenly over n_gpus={n_gpus}")
    if redundant_per_gpu < 0 or any(x < 0 for x in load):
        raise ValueError("redundant_per_gpu and the loads must be >= 0")
    if redundant_per_gpu * n_gpus > len(load) * (n_gpus - 1):
        raise ValueError(f"{redundant_per_gpu * n_gpus} redundant copies cannot all sit on GPUs "
                         f"without a copy of the same expert")
    return load


def replicate(load, n_copies: int, max_copies: int) -> list:
    """Copy counts c_e (sum = E + n_copies, c_e <= max_copies, the number of GPUs: two
    copies on one GPU would split nothing): each extra copy to the largest L_e / c_e."""
    load = [float(x) for x in load]
    if n_copies > len(load) * (max_copies - 1):
        raise ValueError(f"{n_copies} extra copies of {len(load)} experts exceed {max_copies} "
                         f"copies per expert")
    copies = [1] * len(load)
    for _ in range(n_copies):
        expert = max((e for e in range(len(load)) if copies[e] < max_copies),
                     key=lambda e: (load[e] / copies[e], -e))
        copies[expert] += 1
    return copies


def pack(load, copies: list, n_gpus: int) -> list:
    """Greedy packing of every copy (load L_e / c_e) into n_gpus GPUs with equal slots."""
    slots = sum(copies) // n_gpus
    items = sorted(((load[e] / copies[e], e) for e in range(len(copies)) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))
    gpu_experts = [[] for _ in range(n_gpus)]
    gpu_load = [0.0] * n_gpus
    for per_copy, expert in items:
        free = [g for g in range(n_gpus) if len(gpu_experts[g]) < slots]
        fitting = [g for g in free if expert not in gpu_experts[g]] or free
        target = min(fitting, key=lambda g: (gpu_load[g], g))
        gpu_experts[target].append(expert)
        gpu_load[target] += per_copy
    return gpu_experts


def _gpu_load(load, copies, gpu_experts) -> list:
    return [sum(load[e] / copies[e] for e in experts) for experts in gpu_experts]


def place_redundant_experts(load, n_gpus: int, redundant_per_gpu: int) -> Placement:
    """Replicate (optimal for the heaviest copy) then pack (greedy); see the module docstring."""
    load = _check(load, n_gpus, redundant_per_gpu)
    copies = replicate(load, n_gpus * redundant_per_gpu, n_gpus)
    gpu_experts = pack(load, copies, n_gpus)
    return Placement(gpu_experts, copies, _gpu_load(load, copies, gpu_experts))


def contiguous_placement(load, n_gpus: int) -> Placement:
    """Expert parallelism's default: experts [g E/G, (g+1) E/G) on GPU g, one copy each."""
    load = _check(load, n_gpus, 0)
    per_gpu = len(load) // n_gpus
    gpu_experts = [list(range(g * per_gpu, (g + 1) * per_gpu)) for g in range(n_gpus)]
    copies = [1] * len(load)
    return Placement(gpu_experts, copies, _gpu_load(load, copies, gpu_experts))


def lower_bound(load, copies: list, n_gpus: int) -> float:
    """No placement with these copy counts beats max(heaviest copy, mean GPU load)."""
    return max(max(l / c for l, c in zip(load, copies)), sum(load) / n_gpus)


# ----------------------------------------------------------------------------------------------
# Brute force, for small cases: the reference the greedy steps are tested against
# ----------------------------------------------------------------------------------------------
def brute_force_copies(load, n_copies: int, max_copies: int) -> float:
    """min over all copy counts (1 <= c_e <= max_copies, sum = E + n_copies) of max L_e/c_e."""
    best = float("inf")
    E = len(load)
    for extra in itertools.product(range(max_copies), repeat=E):
        if sum(extra) == n_copies:
            best = min(best, max(l / (1 + x) for l, x in zip(load, extra)))
    return best


def brute_force_placement(load, n_gpus: int, redundant_per_gpu: int) -> float:
    """The optimal largest GPU load over every copy count and every assignment (tiny cases)."""
    load = _check(load, n_gpus, redundant_per_gpu)
    E, slots = len(load), len(load) // n_gpus + redundant_per_gpu
    best = float("inf")
    for extra in itertools.product(range(n_gpus), repeat=E):
        if sum(extra) != n_gpus * redundant_per_gpu:
            continue
        copies = [1 + x for x in extra]
        best = min(best, _best_assignment(load, copies, n_gpus, slots))
    return best


def _best_assignment(load, copies, n_gpus, slots) -> float:
    """Every way to put each expert's copies on distinct GPUs with `slots` slots per GPU."""
    best = [float("inf")]
    gpu_load, gpu_free = [0.0] * n_gpus, [slots] * n_gpus

    def assign(expert: int) -> None:
        if expert == len(load):
            best[0] = min(best[0], max(gpu_load))
            return
        per_copy = load[expert] / copies[expert]
        for gpus in itertools.combinations(range(n_gpus), copies[expert]):
            if any(gpu_free[g] == 0 for g in gpus):
                continue
            for g in gpus:
                gpu_load[g] += per_copy
                gpu_free[g] -= 1
            if max(gpu_load) < best[0]:
                assign(expert + 1)
            for g in gpus:
                gpu_load[g] -= per_copy
                gpu_free[g] += 1

    assign(0)
    return best[0]


def placement_report(load, n_gpus: int, redundant_per_gpu: int) -> dict:
    """max/mean GPU load before (contiguous, no copies) and after redundant placement."""
    before = contiguous_placement(load, n_gpus)
    after = place_redundant_experts(load, n_gpus, redundant_per_gpu)
    return {"before": before, "after": after,
            "before_max_over_mean": before.max_over_mean,
            "after_max_over_mean": after.max_over_mean,
            "after_lower_bound": lower_bound([float(x) for x in load], after.copies, n_gpus)
            / (sum(float(x) for x in load) / n_gpus)}
