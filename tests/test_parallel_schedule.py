"""Pipeline schedules: the simulation against DeepSeek-V3 Table 2's closed forms, and a
legality check of every simulated timeline that does not reuse the simulator's code."""

import random

import pytest

from minimoe.parallel.schedule import SCHEDULES, simulate, table2


def assert_legal(result, comm=0.0):
    """Every chunk once, no overlap on a device, every dependency respected (+ comm)."""
    pp, m = result.pp, result.micro_batches
    forward, backward, weight = {}, {}, {}
    for rank, chunks in enumerate(result.timeline):
        for before, after in zip(chunks, chunks[1:]):
            assert after.start >= before.end - 1e-9, (rank, before, after)
        for c in chunks:
            if c.kind in ("F", "F&B"):
                forward[(rank, c.direction, c.micro_batch)] = c
            if c.kind in ("B", "Bi"):
                backward[(rank, c.direction, c.micro_batch)] = c
            if c.kind == "F&B":
                backward[(rank, c.backward_direction, c.backward_micro_batch)] = c
            if c.kind == "W":
                weight[(rank, c.direction, c.micro_batch)] = c
    directions = (0, 1) if result.name == "dualpipe" else (0,)
    per_direction = m // len(directions)
    for d in directions:
        order = list(range(pp)) if d == 0 else list(range(pp - 1, -1, -1))  # stage -> rank
        for j in range(per_direction):
            for s, rank in enumerate(order):
                f, b = forward[(rank, d, j)], backward[(rank, d, j)]
                if s > 0:
                    assert f.start >= forward[(order[s - 1], d, j)].end + comm - 1e-9
                if s < pp - 1:
                    assert b.start >= backward[(order[s + 1], d, j)].end + comm - 1e-9
                else:
                    assert b.start >= f.end - 1e-9
                if (rank, d, j) in weight:
                    assert weight[(rank, d, j)].start >= b.end - 1e-9
    assert len(forward) == len(backward) == pp * m


def random_case(rng, name):
    pp = rng.choice([2, 4, 6, 8, 10]) if name == "dualpipe" else rng.randint(2, 9)
    m = 2 * rng.randint(pp, 3 * pp) if name == "dualpipe" else rng.randint(pp, 3 * pp)
    if name == "1f1b":
        F, B = rng.uniform(0.2, 3), rng.uniform(0.2, 5)
        W = rng.uniform(0, B * 0.9)
    elif name == "zb1p":  # exact when W <= F and W <= B - W
        F, B = rng.uniform(0.5, 3), rng.uniform(0.5, 5)
        W = rng.uniform(0, min(F, B / 2))
    else:  # exact under the equal-chunk assumption F = B - W = W
        F = rng.uniform(0.5, 2)
        B, W = 2 * F, F
    f_and_b = rng.uniform(max(F, B), F + B)
    return pp, m, F, B, W, f_and_b


@pytest.mark.parametrize("name", SCHEDULES)
def test_simulation_reproduces_table2(name):
    rng = random.Random(1234)
    for _ in range(40):
        pp, m, F, B, W, f_and_b = random_case(rng, name)
        result = simulate(name, pp, m, F, B, W, f_and_b=f_and_b)
        formula = table2(name, pp, F, B, W, f_and_b)
        assert result.bubble == pytest.approx(formula["bubble"], abs=1e-9), (pp, m, F, B, W)
        assert result.peak_activations == formula["activations"]
        assert result.stages_per_rank == formula["parameters"]
        busy = sum(c.end - c.start for c in result.timeline[0])
        assert result.makespan == pytest.approx(busy + result.bubble_per_rank[0])
        assert_legal(result)


def test_one_f_one_b_every_device_waits_the_same():
    result = simulate("1f1b", 4, 8, 1.0, 2.0, 0.5)
    assert result.bubble_per_rank == pytest.approx([9.0] * 4)  # (4-1)(1+2)
    assert result.peak_activations_per_rank == [4, 3, 2, 1]  # PP - i in flight on stage i
    assert result.makespan == pytest.approx(8 * 3 + 9)


def test_dualpipe_beats_zb1p_beats_1f1b():
    results = {name: simulate(name, 8, 20, 1.0, 2.0, 1.0, f_and_b=2.5) for name in SCHEDULES}
    assert results["dualpipe"].bubble < results["zb1p"].bubble < results["1f1b"].bubble


def test_outside_its_conditions_a_closed_form_is_not_the_simulation():
    """ZB1P with W > F: deferred W no longer fit their gaps and the formula is optimistic."""
    result = simulate("zb1p", 4, 12, 1.0, 4.0, 1.8)
    assert result.bubble > table2("zb1p", 4, 1.0, 4.0, 1.8)["bubble"] + 0.1


@pytest.mark.parametrize("name", SCHEDULES)
def test_communication_delays_are_respected(name):
    result = simulate(name, 4, 8, 1.0, 2.0, 0.5, comm=0.3)
    assert_legal(result, comm=0.3)
    assert result.makespan > simulate(name, 4, 8, 1.0, 2.0, 0.5).makespan


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="even pp"):
        simulate("dualpipe", 3, 12, 1, 2, 1)
    with pytest.raises(ValueError, match="micro_batches >= 2"):
        simulate("dualpipe", 4, 6, 1, 2, 1)
    with pytest.raises(ValueError, match="one of"):
        simulate("gpipe", 4, 8, 1, 2, 1)
    with pytest.raises(ValueError, match="W < B"):
        simulate("zb1p", 4, 8, 1, 2, 2)


def test_draw_returns_axes():
    import matplotlib

    matplotlib.use("Agg")
    ax = simulate("dualpipe", 4, 8, 1, 2, 1).draw()
    assert ax.get_xlim()[1] > 0 and len(ax.get_yticks()) == 4
