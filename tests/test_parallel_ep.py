"""The expert-parallel MoE layer equals the single-process layer across 2 and 4 processes."""

import pytest
import torch

from minimoe.config import ModelConfig
from minimoe.moe import MoE
from minimoe.parallel import check


@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel_layer_matches_single_process(nproc, capsys):
    results = check.run_check(nproc)
    table, ok = check.format_results(results, nproc)
    print(table)
    assert ok, table
    for case, result in results.items():
        for quantity in check.QUANTITIES:
            diff, tolerance = result[quantity]
            assert diff <= tolerance, (case, quantity, diff, tolerance)
    uneven = results["uneven"]
    assert 0 in uneven["tokens per rank"]  # a rank that sends nothing
    assert uneven["rows per rank"][-1] == 0  # a rank whose experts receive nothing
    assert len(set(uneven["rows per rank"])) > 1  # uneven loads
    toy_rows = results["toy"]["rows per rank"]
    assert sum(toy_rows) == sum(results["toy"]["tokens per rank"]) * 2  # top-2, nothing dropped


def test_check_fails_on_a_wrong_result():
    """The comparison is not vacuous: a perturbed value crosses the tolerance."""
    results = {"toy": {q: (0.0, 1e-5) for q in check.QUANTITIES}}
    results["toy"]["tokens per rank"], results["toy"]["rows per rank"] = [1, 1], [1, 1]
    results["toy"]["expert grads"] = (3e-3, 1e-5)
    table, ok = check.format_results(results, 2)
    assert not ok and "NO" in table
    assert check._max_diff(None, torch.zeros(3)) == float("inf")  # a missing gradient fails


def test_routed_output_hook_is_the_dispatch():
    """MoE.routed_output (the hook the expert-parallel layer overrides) computes the layer's
    routed part: replacing it by zeros leaves exactly the shared experts' output."""
    cfg = ModelConfig.preset("toy")
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    x = torch.randn(2, 5, cfg.hidden_size)
    y, _ = moe(x)
    moe.routed_output = lambda flat, *args: torch.zeros_like(flat)
    y_without, _ = moe(x)
    assert torch.allclose(y_without, moe.shared_experts(x), atol=1e-6)
    assert (y - y_without).abs().max() > 1e-3
