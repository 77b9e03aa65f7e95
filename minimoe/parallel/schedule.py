"""Pipeline schedules, simulated event by event: 1F1B, ZB1P and DeepSeek's DualPipe.

The idea
--------
Pipeline parallelism cuts the layers into PP stages, one per device, and feeds the batch
as m micro-batches. A stage can only start micro-batch j's forward when the previous stage
has finished it, and its backward when the next stage has sent the gradient back; the time
a device spends waiting is the *bubble*. DeepSeek-V3 (technical report §3.2.1, Table 2;
the DualPipe repository's README) compares schedules with four chunk times:

    F    a forward chunk (one stage, one micro-batch)
    B    a full backward chunk (input gradients and weight gradients)
    W    its "backward for weights" part, so the backward for inputs costs B - W
    F&B  two mutually overlapped chunks: a forward and a backward run together on one
         device (their communication hidden behind each other's compute); F&B <= F + B

    method     bubble                      parameters   activations (per device)
    1F1B       (PP - 1)(F + B)             1x           PP
    ZB1P       (PP - 1)(F + B - 2W)        1x           PP
    DualPipe   (PP/2 - 1)(F&B + B - 3W)    2x           PP + 1

The schedules (each device runs a fixed order of chunks; ``simulate`` times it)
-------------------------------------------------------------------------------
* **1F1B** (PipeDream-flush; Narayanan et al. 2021, "Efficient large-scale language model
  training on GPU clusters using Megatron-LM", §2.2.1): stage i runs PP - i - 1 warm-up
  forwards, then alternates one forward and one full backward, then drains the backwards.
  At most PP - i micro-batches are in flight on stage i.
* **ZB1P** (ZB-H1 of Qi et al. 2024, "Zero Bubble Pipeline Parallelism", §3.1): the backward
  is split into B - W (input gradients, which the previous stage waits for) and W (weight
  gradients, which nobody waits for). Stage i runs the same PP - i forwards before its first
  backward; after each input-backward j it runs W_{j-i} (stage i defers its first i weight
  chunks, so the last stage defers the most) and then the next forward; the deferred W fill
  the end of the pipeline, where 1F1B idles. Activations of a micro-batch live until its W:
  still PP at every stage.
* **DualPipe** (DeepSeek-V3 §3.2.1; deepseek-ai/DualPipe, ``dualpipe/dualpipe.py``): every
  device holds *two* stages, stage r of a pipeline running ranks 0 -> PP-1 and stage
  PP-1-r of a second pipeline running PP-1 -> 0 (hence 2x parameters), and the
  micro-batches are fed from both ends, m/2 each way. A device's order is the repository's
  eight steps, with h = min(r, PP-1-r) and "0" the direction in which the device sits in
  the first half of the stages:

      1  (PP/2-h-1)*2 x  F0            5  (PP/2-h-1) x  B1, F1&B0
      2  (h+1)        x  F0, F1        6  (h+1)      x  B1, B0   (later ones split: B-W, W)
      3  (PP/2-h-1)   x  B1-W, W, F1   7  (PP/2-h-1) x  W, B0-W
      4  (m/2-PP+h+1) x  F0&B1, F1&B0  8  (h+1)      x  W        (the deferred weight chunks)

  (in step 4 the two middle ranks run their first F0 and B1 separately; step 6 switches to
  split backwards half-way, as the repository does).

How the simulation works
------------------------
Each device executes its list in order; a chunk starts when the device is free and its
input is there: a forward needs the same micro-batch's forward on the previous stage, a
backward needs the next stage's backward (the last stage: its own forward), each plus
``comm`` when it crosses devices; a weight chunk takes the oldest pending split backward's
place. Durations: F, B, B - W, W, F&B. The bubble of a device is the makespan minus its
busy time; ``ScheduleResult.bubble`` is the largest over devices. Peak activations count
micro-batch-stages alive on a device (+1 at F, -1 when the full backward or W frees it).

What the simulation shows about Table 2
---------------------------------------
The closed forms are exact under conditions the table does not print (with comm = 0 and
m >= PP, m >= 2 PP for DualPipe), which the tests check over random values:

* 1F1B: always.
* ZB1P: when W <= F and W <= B - W (a deferred W must fit into the gaps it fills).
* DualPipe: when F = B - W = W, the equal-chunk assumption of the Zero Bubble analysis
  (for any F&B between max(F, B) and F + B); otherwise the measured bubble differs by a
  fraction of a chunk (``python -m minimoe.parallel.schedule`` prints both).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

SCHEDULES = ("1f1b", "zb1p", "dualpipe")


@dataclass
class Chunk:
    """One executed chunk: kind "F" | "B" (full) | "Bi" (B - W) | "W" | "F&B"."""
    rank: int
    kind: str
    direction: int
    micro_batch: int  # for "F&B" the forward's micro-batch
    start: float
    end: float
    backward_micro_batch: Optional[int] = None  # "F&B" only
    backward_direction: Optional[int] = None  # "F&B" only


@dataclass
class ScheduleResult:
    name: str
    pp: int
    micro_batches: int
    timeline: list  # per rank: list of Chunk in execution order
    makespan: float
    bubble_per_rank: list
    peak_activations_per_rank: list
    stages_per_rank: int  # parameter memory in units of one stage: 1 or 2
    durations: dict = field(default_factory=dict)

    @property
    def bubble(self) -> float:
        return max(self.bubble_per_rank)

    @property
    def peak_activations(self) -> int:
        return max(self.peak_activations_per_rank)

    def draw(self, ax=None, title: Optional[str] = None):
        """A Gantt chart of the timeline (one row per device); returns the matplotlib axes."""
        return draw_timeline(self, ax=ax, title=title)


# ----------------------------------------------------------------------------------------------
# The orders: what each device runs, as (kind, direction) or ("F&B", forward dir, backward dir)
# ----------------------------------------------------------------------------------------------
def order_1f1b(pp: int, m: int, stage: int) -> list:
    warmup = min(pp - stage - 1, m)
    order = [("F", 0)] * warmup
    for j in range(m - warmup):
        order += [("F", 0), ("B", 0)]
    return order + [("B", 0)] * warmup


def order_zb1p(pp: int, m: int, stage: int) -> list:
    forwards = min(pp - stage, m)
    order = [("F", 0)] * forwards
    weights = 0
    for j in range(m):
        order.append(("Bi", 0))
        if j >= stage:  # stage i defers its first i weight chunks
            order.append(("W", 0))
            weights += 1
        if forwards < m:
            order.append(("F", 0))
            forwards += 1
    return order + [("W", 0)] * (m - weights)


def order_dualpipe(pp: int, m: int, rank: int) -> list:
    half_ranks, half_m = pp // 2, m // 2
    h = min(rank, pp - 1 - rank)
    second_half = int(rank >= half_ranks)
    is_middle = h == half_ranks - 1
    d0, d1 = 0 ^ second_half, 1 ^ second_half  # local phase -> direction
    order = [("F", d0)] * ((half_ranks - h - 1) * 2)  # step 1
    order += [("F", d0), ("F", d1)] * (h + 1)  # step 2
    order += [("Bi", d1), ("W", None), ("F", d1)] * (half_ranks - h - 1)  # step 3
    for i in range(half_m - pp + h + 1):  # step 4
        if i == 0 and is_middle:
            order += [("F", d0), ("B", d1)]
        else:
            order.append(("F&B", d0, d1))
        order.append(("F&B", d1, d0))
    order += [("B", d1), ("F&B", d1, d0)] * (half_ranks - h - 1)  # step 5
    split = False
    for i in range(h + 1):  # step 6: the second half of these backwards are split
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        order.append(("Bi" if split else "B", d1))
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        order.append(("Bi" if split else "B", d0))
    order += [("W", None), ("Bi", d0)] * (half_ranks - h - 1)  # step 7
    return order + [("W", None)] * (h + 1)  # step 8


def check_arguments(name: str, pp: int, micro_batches: int, F, B, W) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"schedule name must be one of {SCHEDULES}, got {name!r}")
    if pp < 1 or micro_batches < 1:
        raise ValueError(f"pp and micro_batches must be >= 1, got {pp}, {micro_batches}")
    if not (F > 0 and B > 0 and 0 <= W < B):
        raise ValueError(f"chunk times need F > 0, B > 0, 0 <= W < B; got F={F}, B={B}, W={W}")
    if name == "dualpipe" and (pp % 2 or micro_batches % 2 or micro_batches < 2 * pp):
        raise ValueError(f"dualpipe needs an even pp and an even micro_batches >= 2 * pp "
                         f"(m/2 from each end), got pp={pp}, micro_batches={micro_batches}")


# ----------------------------------------------------------------------------------------------
# The event-level simulation
# ----------------------------------------------------------------------------------------------
def simulate(name: str, pp: int, micro_batches: int, F: float, B: float, W: float,
             comm: float = 0.0, f_and_b: Optional[float] = None) -> ScheduleResult:
    """Time the schedule ``name`` on ``pp`` devices; see the module docstring.

    F, B, W: forward, full backward, weight-backward chunk times; comm: the time a stage's
    output or gradient takes to reach the neighbouring device; f_and_b: the time of an
    overlapped forward + backward pair (DualPipe), default F + B (no overlap gain)."""
    check_arguments(name, pp, micro_batches, F, B, W)
    f_and_b = F + B if f_and_b is None else f_and_b
    builder = {"1f1b": order_1f1b, "zb1p": order_zb1p, "dualpipe": order_dualpipe}[name]
    orders = [builder(pp, micro_batches, rank) for rank in range(pp)]
    durations = {"F": F, "B": B, "Bi": B - W, "W": W, "F&B": f_and_b}
    state = _SimulationState(pp, comm)
    total = sum(len(order) for order in orders)
    while state.done < total:
        progressed = False
        for rank in range(pp):
            while state.position[rank] < len(orders[rank]):
                if not state.try_run(rank, orders[rank][state.position[rank]], durations):
                    break
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name!r} deadlocked at positions {state.position}")
    makespan = max(state.free_at)
    busy = [sum(chunk.end - chunk.start for chunk in chunks) for chunks in state.timeline]
    directions = [{c.direction for c in chunks if c.kind == "F"} for chunks in state.timeline]
    return ScheduleResult(
        name=name, pp=pp, micro_batches=micro_batches, timeline=state.timeline,
        makespan=makespan, bubble_per_rank=[makespan - b for b in busy],
        peak_activations_per_rank=state.peak, stages_per_rank=max(len(d) for d in directions),
        durations=dict(durations, comm=comm))


class _SimulationState:
    """Finish times of every (kind, rank, direction, micro-batch) and per-device counters."""

    def __init__(self, pp: int, comm: float) -> None:
        self.pp, self.comm = pp, comm
        self.finish: dict = {}
        self.free_at = [0.0] * pp
        self.position = [0] * pp
        self.next_forward = [[0, 0] for _ in range(pp)]  # per direction
        self.next_backward = [[0, 0] for _ in range(pp)]
        self.pending_weights = [[] for _ in range(pp)]  # FIFO of (direction, micro-batch)
        self.alive = [0] * pp
        self.peak = [0] * pp
        self.timeline = [[] for _ in range(pp)]
        self.done = 0

    def stage(self, rank: int, direction: int) -> int:
        return rank if direction == 0 else self.pp - 1 - rank

    def neighbour(self, rank: int, direction: int, step: int) -> int:
        """The device `step` stages further along `direction` (-1: previous, +1: next)."""
        return rank + step if direction == 0 else rank - step

    def forward_ready(self, rank: int, direction: int, j: int) -> Optional[float]:
        if self.stage(rank, direction) == 0:
            return 0.0
        done = self.finish.get(("F", self.neighbour(rank, direction, -1), direction, j))
        return None if done is None else done + self.comm

    def backward_ready(self, rank: int, direction: int, j: int) -> Optional[float]:
        if self.stage(rank, direction) == self.pp - 1:
            return self.finish.get(("F", rank, direction, j))
        done = self.finish.get(("B", self.neighbour(rank, direction, +1), direction, j))
        return None if done is None else done + self.comm

    def try_run(self, rank: int, op: tuple, durations: dict) -> bool:
        """Run the op if its inputs are there; False when it must wait for another device."""
        kind = op[0]
        if kind == "F&B":
            forward_dir, backward_dir = op[1], op[2]
            jf, jb = self.next_forward[rank][forward_dir], self.next_backward[rank][backward_dir]
            ready_f = self.forward_ready(rank, forward_dir, jf)
            ready_b = self.backward_ready(rank, backward_dir, jb)
            if ready_f is None or ready_b is None:
                return False
            start = max(self.free_at[rank], ready_f, ready_b)
            end = start + durations["F&B"]
            self._forward_done(rank, forward_dir, jf, end)
            self._backward_done(rank, backward_dir, jb, end, full=True)
            self._record(Chunk(rank, kind, forward_dir, jf, start, end, jb, backward_dir))
            return True
        if kind == "W":
            direction, j = self.pending_weights[rank].pop(0)
            start = self.free_at[rank]
            self.alive[rank] -= 1  # the micro-batch's saved inputs are freed with its W
            self._record(Chunk(rank, "W", direction, j, start, start + durations["W"]))
            return True
        direction = op[1]
        if kind == "F":
            j = self.next_forward[rank][direction]
            ready = self.forward_ready(rank, direction, j)
        else:
            j = self.next_backward[rank][direction]
            ready = self.backward_ready(rank, direction, j)
        if ready is None:
            return False
        start = max(self.free_at[rank], ready)
        end = start + durations[kind]
        if kind == "F":
            self._forward_done(rank, direction, j, end)
        else:
            self._backward_done(rank, direction, j, end, full=kind == "B")
        self._record(Chunk(rank, kind, direction, j, start, end))
        return True

    def _forward_done(self, rank, direction, j, end) -> None:
        self.finish[("F", rank, direction, j)] = end
        self.next_forward[rank][direction] += 1
        self.alive[rank] += 1
        self.peak[rank] = max(self.peak[rank], self.alive[rank])

    def _backward_done(self, rank, direction, j, end, full: bool) -> None:
        self.finish[("B", rank, direction, j)] = end
        self.next_backward[rank][direction] += 1
        if full:
            self.alive[rank] -= 1
        else:
            self.pending_weights[rank].append((direction, j))

    def _record(self, chunk: Chunk) -> None:
        self.free_at[chunk.rank] = chunk.end
        self.timeline[chunk.rank].append(chunk)
        self.position[chunk.rank] += 1
        self.done += 1


# ----------------------------------------------------------------------------------------------
# Table 2 and the drawing
# ----------------------------------------------------------------------------------------------
def table2(name: str, pp: int, F: float, B: float, W: float, f_and_b: Optional[float] = None) -> dict:
    """DeepSeek-V3 Table 2's closed forms: bubble, parameters (x one stage), activations."""
    f_and_b = F + B if f_and_b is None else f_and_b
    if name == "1f1b":
        return {"bubble": (pp - 1) * (F + B), "parameters": 1, "activations": pp}
    if name == "zb1p":
        return {"bubble": (pp - 1) * (F + B - 2 * W), "parameters": 1, "activations": pp}
    if name == "dualpipe":
        return {"bubble": (pp / 2 - 1) * (f_and_b + B - 3 * W), "parameters": 2,
                "activations": pp + 1}
    raise ValueError(f"schedule name must be one of {SCHEDULES}, got {name!r}")


COLOURS = {"F": "#4C72B0", "B": "#55A868", "Bi": "#8FD19E", "W": "#C9A227", "F&B": "#8172B3"}


def _label(chunk: Chunk) -> str:
    if chunk.kind == "F&B":
        return f"{chunk.micro_batch}|{chunk.backward_micro_batch}"
    return str(chunk.micro_batch)


def draw_timeline(result: ScheduleResult, ax=None, title: Optional[str] = None):
    """One row per device, one box per chunk (F blue, B green, B-W light green, W gold,
    F&B purple); the reverse direction of DualPipe is hatched. Returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 0.45 * result.pp + 1.2))
    for rank, chunks in enumerate(result.timeline):
        for chunk in chunks:
            width = chunk.end - chunk.start
            ax.broken_barh([(chunk.start, width)], (rank - 0.4, 0.8),
                           facecolors=COLOURS[chunk.kind], edgecolor="black", linewidth=0.4,
                           hatch="//" if chunk.direction == 1 and result.name == "dualpipe" else None)
            if width >= 0.6 * result.durations["F"]:
                ax.text(chunk.start + width / 2, rank, _label(chunk), ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_yticks(range(result.pp), [f"device {r}" for r in range(result.pp)])
    ax.invert_yaxis()
    ax.set_xlim(0, result.makespan)
    ax.set_xlabel("time")
    names = {"F": "F", "B": "B (full)", "Bi": "B - W", "W": "W", "F&B": "F&B"}
    kinds = sorted({c.kind for chunks in result.timeline for c in chunks}, key=list(names).index)
    ax.legend(handles=[Patch(color=COLOURS[k], label=names[k]) for k in kinds],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    ax.set_title(title or f"{result.name}: PP={result.pp}, {result.micro_batches} micro-batches, "
                 f"bubble {result.bubble:.2f}, peak activations {result.peak_activations}")
    return ax


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Simulate pipeline schedules; compare with "
                                     "DeepSeek-V3 Table 2.")
    parser.add_argument("--pp", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=20)
    parser.add_argument("--F", type=float, default=1.0)
    parser.add_argument("--B", type=float, default=2.0)
    parser.add_argument("--W", type=float, default=1.0)
    parser.add_argument("--f-and-b", type=float, default=None)
    parser.add_argument("--comm", type=float, default=0.0)
    args = parser.parse_args(argv)
    print(f"{'schedule':<10}{'bubble':>10}{'Table 2':>10}{'makespan':>10}{'params':>8}"
          f"{'activations':>13}{'Table 2':>9}")
    for name in SCHEDULES:
        result = simulate(name, args.pp, args.micro_batches, args.F, args.B, args.W,
                          comm=args.comm, f_and_b=args.f_and_b)
        formula = table2(name, args.pp, args.F, args.B, args.W, args.f_and_b)
        print(f"{name:<10}{result.bubble:>10.2f}{formula['bubble']:>10.2f}{result.makespan:>10.2f}"
              f"{result.stages_per_rank:>7}x{result.peak_activations:>13}{formula['activations']:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
