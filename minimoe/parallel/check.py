"""Proof by comparison: the expert-parallel layer computes what the single-process layer does.

    python -m minimoe.parallel.check --nproc 4

spawns N CPU processes (gloo, one thread each, file:// rendezvous). Every process builds the
same single-process ``minimoe.moe.MoE`` (same seed), shards it with
``minimoe.parallel.expert_parallel.shard_moe``, and runs its own slice of the tokens through
the expert-parallel layer; it also runs the single-process layer on every slice as the
reference. With loss_r = sum(y_r * g_r) + (balance losses of slice r) for fixed random g_r:

* outputs y_r and input gradients dL/dx_r must equal the reference's on slice r;
* each rank's expert gradients must equal the rows of the reference's (E, I, C) gradients
  that the rank owns (they collect the contributions of *all* ranks' tokens through the
  backward all-to-all);
* the replicated router and shared-expert gradients, summed over ranks, must equal the
  reference's (what a trainer's all-reduce computes);
* after ``update_expert_bias`` every rank's router bias must equal the reference's (the
  load counters are summed over the group first).

Cases: "uneven" (slices of different lengths, one rank with no tokens at all, and the last
rank's experts starved by a -1e4 selection bias so that it receives no rows), "toy" (the toy
preset's MoE: sigmoid router, groups, bias, sequence-wise balance loss) and "zero+capacity"
(LongCat's zero-computation experts and token dropping, capacity counted per rank). The
largest differences are printed; the exit status is 1 when one exceeds the tolerance
(float32: 1e-5 * (1 + largest reference value)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minimoe.config import ModelConfig
from minimoe.moe import MoE
from minimoe.parallel.expert_parallel import shard_moe

TOLERANCE = 1e-5
QUANTITIES = ("output", "input grad", "expert grads", "router grad", "shared grads", "bias update")


def case_setup(name: str, world: int):
    """(config, per-rank input shapes (B, T), experts to starve) of one check case."""
    if name == "uneven":
        cfg = ModelConfig.preset(
            "toy", hidden_size=32, n_routed_experts=4 * world, num_experts_per_tok=3,
            moe_intermediate_size=16, scoring_func="softmax", topk_method="greedy", n_group=1,
            topk_group=1, norm_topk_prob=False, seq_aux_loss_alpha=0.0)
        lengths = [13, 0, 6, 21] if world >= 4 else [0, 19]
        shapes = [(1, lengths[r % len(lengths)] + (r // len(lengths))) for r in range(world)]
        starved = list(range(cfg.n_routed_experts - 4, cfg.n_routed_experts))  # the last rank's
        return cfg, shapes, starved
    if name == "toy":
        return ModelConfig.preset("toy"), [(2, 4 + 3 * r) for r in range(world)], []
    if name == "zero+capacity":
        cfg = ModelConfig.preset("toy", n_zero_experts=4, capacity_factor=1.0)
        return cfg, [(2, 9 - r) for r in range(world)], []
    raise ValueError(f"unknown check case {name!r}")


def _max_diff(got, want) -> float:
    if got is None:  # a gradient that never arrived (a trainer's optimizer would skip it)
        return float("inf")
    return float((got.double() - want.double()).abs().max()) if want.numel() else 0.0


def _scale(want) -> float:
    return 1.0 + (float(want.abs().max()) if want.numel() else 0.0)


def run_case(name: str, rank: int, world: int) -> dict:
    """Run one case on this rank; returns {quantity: (max diff, tolerance)} and the loads."""
    cfg, shapes, starved = case_setup(name, world)
    torch.manual_seed(0)
    reference = MoE(cfg).train()
    with torch.no_grad():
        reference.gate.e_score_correction_bias[starved] = -1e4
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(*shape, cfg.hidden_size, generator=gen) for shape in shapes]  # W x (B, T, C)
    cotangents = [torch.randn(x.shape, generator=gen) for x in xs]  # W x (B, T, C)
    parallel = shard_moe(reference)  # before the reference's counters move

    # the reference: the single-process layer on every rank's slice, gradients summed
    ref_out, ref_input_grad = [], []
    for x, g in zip(xs, cotangents):
        x = x.clone().requires_grad_()
        y, aux = reference(x)  # (B, T, C)
        ((y * g).sum() + sum(aux["losses"].values(), torch.zeros(()))).backward()
        ref_out.append(y.detach())
        ref_input_grad.append(x.grad)

    x = xs[rank].clone().requires_grad_()
    y, aux = parallel(x)  # (B, T, C)
    ((y * cotangents[rank]).sum() + sum(aux["losses"].values(), torch.zeros(()))).backward()

    start, stop = parallel.first_expert, parallel.first_expert + parallel.local_count
    pairs = {"output": [(y.detach(), ref_out[rank])], "input grad": [(x.grad, ref_input_grad[rank])],
             "expert grads": [], "router grad": [], "shared grads": []}
    for tensor_name in ("gate_proj", "up_proj", "down_proj"):
        pairs["expert grads"].append((getattr(parallel.experts, tensor_name).grad,
                                      getattr(reference.experts, tensor_name).grad[start:stop]))
    for prefix, key in (("gate.", "router grad"), ("shared_experts.", "shared grads")):
        for pname, param in parallel.named_parameters():
            if pname.startswith(prefix) and param.grad is not None:
                summed = param.grad.clone()
                dist.all_reduce(summed)  # what a trainer's gradient all-reduce does
                pairs[key].append((summed, dict(reference.named_parameters())[pname].grad))
    before = reference.gate.e_score_correction_bias.clone()  # (E,) equal on every rank
    parallel.update_expert_bias()
    reference.update_expert_bias()
    pairs["bias update"] = [(parallel.gate.e_score_correction_bias - before,
                             reference.gate.e_score_correction_bias - before)]  # the steps

    result = {}
    for quantity in QUANTITIES:
        diffs = torch.tensor([max((_max_diff(g, w) for g, w in pairs[quantity]), default=0.0),
                              max((_scale(w) for _, w in pairs[quantity]), default=1.0)])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        result[quantity] = (float(diffs[0]), TOLERANCE * float(diffs[1]))
    # rows each rank's experts received (the load the all-to-all delivered), tokens per rank
    with torch.no_grad():
        routed = reference.gate(torch.cat([x.reshape(-1, cfg.hidden_size) for x in xs])).topk_idx
        routed = routed[routed < cfg.n_routed_experts]
        received = torch.bincount(routed // parallel.local_count, minlength=world)  # (W,)
    result["rows per rank"] = received.tolist()
    result["tokens per rank"] = [shape[0] * shape[1] for shape in shapes]
    return result


def _worker(rank: int, world: int, init_file: str, result_path: str, cases: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: run_case(name, rank, world) for name in cases}
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(result_path, "w") as handle:
            json.dump(results, handle)


def run_check(nproc: int, cases=("uneven", "toy", "zero+capacity")) -> dict:
    """Spawn ``nproc`` gloo processes, run the cases, return {case: {quantity: (diff, tol)}}."""
    if nproc < 2:
        raise ValueError(f"--nproc must be at least 2, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        result_path = os.path.join(folder, "result.json")
        mp.spawn(_worker, args=(nproc, init_file, result_path, list(cases)), nprocs=nproc, join=True)
        with open(result_path) as handle:
            return json.load(handle)


def format_results(results: dict, nproc: int) -> tuple[str, bool]:
    """A table of the largest differences; ok is False when one exceeds its tolerance."""
    lines = [f"expert-parallel layer vs single-process layer, {nproc} processes (gloo, float32)",
             f"{'case':<14}{'quantity':<14}{'max |diff|':>12}{'tolerance':>12}  ok"]
    ok = True
    for case, result in results.items():
        for quantity in QUANTITIES:
            diff, tol = result[quantity]
            passed = diff <= tol
            ok &= passed
            lines.append(f"{case:<14}{quantity:<14}{diff:>12.2e}{tol:>12.1e}  {'yes' if passed else 'NO'}")
        lines.append(f"{'':<14}tokens per rank {result['tokens per rank']}, "
                     f"rows received per rank {result['rows per rank']}")
    return "\n".join(lines), ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="number of processes (>= 2)")
    args = parser.parse_args(argv)
    table, ok = format_results(run_check(args.nproc), args.nproc)
    print(table)
    print("all equal within tolerance" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
