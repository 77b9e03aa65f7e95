"""The explorers headless: pure functions against independent references, then each widget
constructed, a control changed and its result read (the browser side: test_browser.py)."""

import itertools
import json
import math
import re

import pytest
import torch

import minimoe
from minimoe.widgets import routing_data
from minimoe.widgets.routing import RoutingExplorer, byte_token_labels


def naive_route(logits, bias, k, scoring, temperature, n_group, topk_group, group_score,
                norm, scale, capacity_factor):
    """The routing written out with loops, straight from the formulas (no minimoe code)."""
    N, E = len(logits), len(logits[0])
    experts, weights = [], []
    for row in logits:
        u = [x / temperature for x in row]
        if scoring == "softmax":
            top = max(u)
            ex = [math.exp(x - top) for x in u]
            s = [x / sum(ex) for x in ex]
        else:
            s = [1 / (1 + math.exp(-x)) for x in u]
        choice = [s[i] + (bias[i] if bias is not None else 0.0) for i in range(E)]
        per = E // n_group
        allowed = set(range(E))
        if n_group > 1:
            def group_value(g):
                members = sorted(choice[g * per:(g + 1) * per], reverse=True)
                return members[0] if group_score == "max" else members[0] + members[1]
            best = sorted(range(n_group), key=lambda g: -group_value(g))[:topk_group]
            allowed = {i for g in best for i in range(g * per, (g + 1) * per)}
        chosen = sorted(allowed, key=lambda i: -choice[i])[:k]
        w = [s[i] for i in chosen]
        if norm:
            w = [x / (sum(w) + 1e-20) for x in w]
        experts.append(chosen)
        weights.append([x * scale for x in w])
    kept = [[True] * k for _ in range(N)]
    if capacity_factor > 0:
        capacity = math.ceil(capacity_factor * N * k / E)
        filled = [0] * E
        ranks = [sorted(range(k), key=lambda j: (-weights[t][j], j)) for t in range(N)]
        for r in range(k):
            for t in range(N):
                j = ranks[t][r]
                kept[t][j] = filled[experts[t][j]] < capacity
                filled[experts[t][j]] += 1
    counts = [0] * E
    for t in range(N):
        for j in range(k):
            counts[experts[t][j]] += kept[t][j]
    load = [c / max(sum(counts), 1) for c in counts]
    max_vio = (max(load) - 1 / E) / (1 / E)
    return experts, weights, kept, counts, max_vio


SPEC = {"n_experts": 8, "group_score": "top2_sum", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "bias": [0.3, -0.2, 0.0, 0.1, -0.4, 0.25, -0.05, 0.2]}


@pytest.mark.parametrize("scoring,temperature,use_bias,n_group,topk_group,group_score,cf", [
    ("sigmoid", 1.0, True, 4, 2, "top2_sum", 0.0),
    ("sigmoid", 0.5, True, 2, 1, "max", 1.0),
    ("softmax", 2.0, False, 1, 1, "top2_sum", 1.25),
    ("softmax", 1.0, True, 4, 3, "max", 0.5),
])
def test_route_equals_the_formulas_written_out(scoring, temperature, use_bias, n_group,
                                               topk_group, group_score, cf):
    torch.manual_seed(0)
    logits = torch.randn(40, 8, dtype=torch.float64) * 2  # (N, E)
    spec = dict(SPEC, group_score=group_score)
    settings = {"layer": "x", "top_k": 3, "scoring_func": scoring, "temperature": temperature,
                "use_bias": use_bias, "bias_scale": 1.5, "n_group": n_group,
                "topk_group": topk_group, "capacity_factor": cf}
    got = routing_data.route(logits, spec, settings)
    bias = [1.5 * b for b in SPEC["bias"]] if use_bias else None
    experts, weights, kept, counts, max_vio = naive_route(
        logits.tolist(), bias, 3, scoring, temperature, n_group, topk_group, group_score,
        True, 2.5, cf)
    assert got["experts"] == experts
    assert torch.allclose(torch.tensor(got["weights"]), torch.tensor(weights), atol=1e-12)
    assert got["kept"] == kept
    assert got["tokens_per_expert"] == counts
    assert got["max_vio"] == pytest.approx(max_vio, rel=1e-6)
    assert got["dropped_slots"] == 40 * 3 - sum(counts)
    if cf == 0:
        assert got["dropped_slots"] == 0 and got["capacity"] is None


def test_bad_settings_name_the_control():
    logits = torch.zeros(4, 8, dtype=torch.float64)
    base = {"layer": "x", "top_k": 2, "scoring_func": "sigmoid", "temperature": 1.0,
            "use_bias": False, "bias_scale": 1.0, "n_group": 4, "topk_group": 2,
            "capacity_factor": 0.0}
    for change, word in ((dict(top_k=9), "top_k"), (dict(n_group=3), "n_group"),
                         (dict(top_k=5, topk_group=2), "topk_group"),
                         (dict(temperature=0.0), "temperature"),
                         (dict(scoring_func="relu"), "scoring_func"),
                         (dict(capacity_factor=-1.0), "capacity_factor")):
        with pytest.raises(ValueError, match=word):
            routing_data.route(logits, SPEC, dict(base, **change))


def random_toy(seed=0, bias=True):
    torch.manual_seed(seed)
    model = minimoe.Transformer(minimoe.ModelConfig.preset("toy"))
    if bias:  # what training leaves in the buffers: a spread of per-expert biases
        for router in routing_data.moe_routers(model).values():
            router.e_score_correction_bias.copy_(torch.linspace(-0.03, 0.03, router.n_experts)
                                                 [torch.randperm(router.n_experts)])
    return model


def test_default_settings_reproduce_the_models_own_routing():
    from minimoe.viz import collect_routing

    model = random_toy()
    explorer = RoutingExplorer(model, "Routing, token by token: 12 + 7 = 19", domains=False)
    ids = torch.tensor([minimoe.data.ByteTokenizer().encode("Routing, token by token: 12 + 7 = 19")])
    own = collect_routing(model, ids)  # the model's forward pass, float32
    for name, topk_idx in own.items():
        assert explorer.result["layers"][name]["experts"] == topk_idx[0].tolist()


def test_explorer_result_follows_the_controls():
    explorer = RoutingExplorer(random_toy(), "The cat sat on the mat. def f(x): return x")
    layer = explorer.layer
    before = explorer.result["layers"][layer]
    assert len(before["experts"][0]) == 2 and explorer.use_bias and explorer.n_group == 4
    explorer.top_k = 4
    assert len(explorer.result["layers"][layer]["experts"][0]) == 4
    explorer.top_k = 2
    explorer.use_bias = False
    unbiased = explorer.result["layers"][layer]["experts"]
    assert unbiased != before["experts"]  # the bias changed some choices
    explorer.capacity_factor = 1.0
    assert explorer.result["layers"][layer]["dropped_slots"] > 0
    assert explorer.result["layers"][layer]["capacity"] == math.ceil(
        1.0 * len(unbiased) * 2 / 16)
    explorer.scoring_func, explorer.temperature = "softmax", 0.5
    assert explorer.result["settings"]["scoring_func"] == "softmax"
    # domain panel: usage rows are distributions and I(domain; expert) is within [0, ln 5]
    domains = explorer.result["domains"]
    usage = torch.tensor(domains["usage"][layer])
    assert usage.shape == (5, 16) and torch.allclose(usage.sum(1), torch.ones(5, dtype=usage.dtype))
    assert 0 <= domains["mutual_information"][layer] <= math.log(5)


def test_domain_usage_equals_the_formula():

    torch.manual_seed(0)
    experts = torch.randint(0, 16, (5 * 12, 2))  # (D*T, k)
    usage, information = routing_data.domain_usage(experts.tolist(), 5, 16)
    joint = torch.zeros(5, 16, dtype=torch.float64)
    for t, row in enumerate(experts.tolist()):
        for e in row:
            joint[t // 12, e] += 1
    joint /= joint.sum()
    independent = sum(float(joint[d, e] * math.log(joint[d, e] / (joint[d].sum() * joint[:, e].sum())))
                      for d in range(5) for e in range(16) if joint[d, e] > 0)
    assert information == pytest.approx(independent, rel=1e-12)
    assert torch.allclose(torch.tensor(usage, dtype=torch.float64), joint / joint.sum(1, keepdim=True))


def test_explorer_on_a_trained_run_folder(tmp_path):
    from minimoe.train import TrainArgs, load_checkpoint, save_checkpoint

    model = random_toy(seed=1)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(str(tmp_path / "run"), model, optimizer, step=1, args=TrainArgs(), history=[])
    loaded = load_checkpoint(str(tmp_path / "run"))
    explorer = RoutingExplorer(loaded, "abc", domains=False)
    original = RoutingExplorer(model, "abc", domains=False)
    assert explorer.result["layers"] == original.result["layers"]


def test_explorer_on_a_load_pretrained_layer_subset(tmp_path):
    from minimoe.checkpoints.export import save_pretrained

    import dataclasses

    cfg = dataclasses.replace(minimoe.ModelConfig.preset("toy"), vocab_size=64,
                              num_nextn_predict_layers=0)
    torch.manual_seed(2)
    save_pretrained(minimoe.Transformer(cfg), tmp_path / "ckpt")
    subset = minimoe.load_pretrained(tmp_path / "ckpt", layers=[0, 2])
    with pytest.raises(ValueError, match="token_ids"):
        RoutingExplorer(subset, "text needs bytes")
    explorer = RoutingExplorer(subset, token_ids=list(range(10, 30)))
    assert explorer.result["domains"] is None  # no tokenizer, no domain panel
    assert list(explorer.result["layers"]) == list(routing_data.moe_routers(subset))
    assert len(explorer.result["layers"][explorer.layer]["experts"]) == 20


def test_to_html_is_self_contained(tmp_path):
    explorer = RoutingExplorer(random_toy(), "Self-contained </script> page")
    path = explorer.to_html(tmp_path / "page.html")
    page = open(path, encoding="utf-8").read()
    assert "export default" in page and "routeLayer" in page  # the module is inlined
    assert not re.search(r"<script[^>]+src=|https?://|cdn", page, re.IGNORECASE)
    assert page.count("</script>") == 1  # the text's '</script>' cannot close the element
    state = json.loads(re.search(r"const state = (.*);\n", page).group(1).replace("<\\/", "</"))
    assert state["top_k"] == explorer.top_k and state["data"]["layer_names"] == ["layers.1", "layers.2", "layers.3"]


def test_byte_token_labels_show_each_character_once():
    ids = list("a مر\n".encode("utf-8"))
    assert byte_token_labels(ids) == ["a", " ", "م", "·", "ر", "·", "⏎"]


# ------------------------------------------------------------------ the other explorers

def test_positions_curves_follow_the_yarn_ramp():
    from minimoe.widgets import PositionsExplorer
    from minimoe.widgets.positions_view import positions_curves

    curves = positions_curves(head_dim=64, rotary_fraction=1.0, theta=10000.0, original=4096,
                              factor=40.0, beta_fast=32.0, beta_slow=1.0, max_distance=8192)
    rope = torch.tensor(curves["methods"]["rope"]["inv_freq"], dtype=torch.float64)
    expected = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(rope, expected, rtol=1e-6)
    linear = torch.tensor(curves["methods"]["linear"]["inv_freq"], dtype=torch.float64)
    assert torch.allclose(linear, expected / 40, rtol=1e-6)
    yarn = torch.tensor(curves["methods"]["yarn"]["inv_freq"], dtype=torch.float64)
    low, high = curves["methods"]["yarn"]["yarn_low_high"]
    assert torch.allclose(yarn[: int(low)], expected[: int(low)], rtol=1e-6)  # fast pairs kept
    assert torch.allclose(yarn[math.ceil(high):], expected[math.ceil(high):] / 40, rtol=1e-6)
    c = curves["methods"]["yarn"]["cos_sin_scale"]
    assert c == pytest.approx(0.1 * math.log(40) + 1)
    assert curves["methods"]["yarn"]["score"][0] == pytest.approx(c * c, rel=1e-6)
    assert curves["methods"]["rope"]["score"][0] == pytest.approx(1.0)
    partial = positions_curves(64, 0.25, 10000.0, 4096, 40.0, 32.0, 1.0, 8192)
    assert min(partial["methods"]["rope"]["score"]) >= 0.75 - 0.25 - 1e-9  # 3/4 never decays
    explorer = PositionsExplorer()
    explorer.controls["rotary_fraction"].value = 0.5
    assert explorer.result["rotary_dim"] == 32


def test_fp8_explorer_fine_scaling_beats_per_tensor_on_outliers():
    from minimoe.widgets import Fp8Explorer
    from minimoe.widgets.fp8_view import outlier_tensor, scaling_errors

    x, is_outlier = outlier_tensor(128, 256, 1e-3, 1e5)
    errors = scaling_errors(x, is_outlier)
    # independent per-tensor e4m3: one scale amax / 448, round through float8_e4m3fn
    scale = x.abs().max() / 448.0
    deq = (x / scale).to(torch.float8_e4m3fn).float() * scale
    normal = ~is_outlier
    independent = float((deq - x)[normal].norm() / x[normal].norm())
    assert errors["per-tensor"]["relative"] == pytest.approx(independent, rel=1e-3)
    assert errors["1x128 tiles"]["relative"] < 0.05 < errors["per-tensor"]["relative"]
    plain, none = outlier_tensor(128, 256, 0.0, 1e5)
    assert scaling_errors(plain, none)["per-tensor"]["relative"] < 0.05
    explorer = Fp8Explorer(tokens=128, channels=256)
    before = explorer.result["errors"]["per-tensor"]["relative"]
    explorer.controls["outlier_factor"].value = 1.0
    assert explorer.result["errors"]["per-tensor"]["relative"] < before


def test_balance_explorer_step_slider():
    from minimoe.widgets import BalanceExplorer
    from minimoe.widgets.balance_view import balance_at_step

    results = {"runs": {"aux-free": {
        "step": [1, 2, 3, 4], "max_vio": [4.0, 3.0, 2.0, 1.0],
        "max_vio_by_layer": {"layers.1": [8.0, 6.0, 4.0, 2.0]},
        "val_step": [2, 4], "val_loss": [1.5, 1.2],
        "usage": {"layers.1": [[0.5, 0.5], [1.0, 0.0]]}}}}
    at = balance_at_step(results, step=3, window=2)["aux-free"]
    assert at["max_vio"] == pytest.approx(2.5) and at["max_vio_by_layer"]["layers.1"] == pytest.approx(5.0)
    assert at["val_loss"] == 1.5 and at["final_load"]["layers.1"] == [0.75, 0.25]
    explorer = BalanceExplorer()  # the committed notebook 02 results
    explorer.controls["step"].value = 100
    assert explorer.result["step"] == 100
    assert explorer.result["runs"]["unbalanced"]["max_vio"] > explorer.result["runs"]["aux-loss"]["max_vio"]
