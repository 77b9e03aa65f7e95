"""What the routing explorer shows, as pure functions (no widget, no browser).

The split
---------
Routing has one expensive part and one cheap part. The expensive part is the model: every
layer below a router changes the hidden state it sees, so the router *logits* u = x W^T
(minimoe.router, step 1) need a forward pass. Everything after the logits is cheap and has
no learned state except the expert bias:

    scores  s   = softmax(u / T)  or  sigmoid(u / T)        T: a temperature, 1 = the model
    chosen  idx = TopK(s + b, k)  within the topk_group best of n_group groups
    weights g   = s[idx] (/ sum) * routed_scaling_factor
    kept        = capacity_keep_mask(idx, g, capacity_factor)   (balance.py, GShard order)
    load, MaxVio, dropped slots                               (balance.router_stats)

So the explorer runs the model ONCE (`capture_router_logits`), stores the logits, and
recomputes the rest whenever a control moves. `route` does that recomputation with the
package's own functions (minimoe.router.select_experts and gate_weights, minimoe.balance.
capacity_keep_mask and router_stats); the browser front end (static/routing.js) repeats
it in JavaScript so that an exported page works without Python, and the tests check that
the two agree on the same inputs.

The temperature divides the logits before the score function. For softmax it sharpens
(T < 1) or flattens (T > 1) the distribution; for sigmoid it moves every score towards
0/1 or towards 1/2, which changes the gate weights and, with a bias, the choice.

Per-domain usage (Mixtral, Jiang et al. 2024, §5 "Routing analysis", Fig. 7) runs a few
documents of each domain of the bundled corpus (minimoe.data) through the same model and
tabulates, per layer, which experts each domain's token-slots go to, with the mutual
information I(domain; expert) of minimoe.viz.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch

from minimoe import balance, data as data_lib, viz
from minimoe.router import gate_weights, select_experts

SCORING_FUNCS = ("softmax", "sigmoid")


def moe_routers(model) -> dict:
    """{layer name: Router} for every MoE layer of the main model (MTP modules skipped)."""
    from minimoe.moe import MoE

    routers = {name.removesuffix(".mlp"): module.gate for name, module in model.named_modules()
               if isinstance(module, MoE) and not name.startswith("mtp")}
    if not routers:
        raise ValueError(f"the model {model.cfg.name!r} has no MoE layer to explore "
                         "(every block is dense)")
    return routers


@torch.no_grad()
def demo_model(seed: int = 0):
    """A random ``toy`` whose experts' selection biases are spread over [-0.03, 0.03], as
    training leaves them: what the book's page and the README's screenshot show when no
    trained run is at hand (the bias switch then visibly changes the routing)."""
    from minimoe.config import ModelConfig
    from minimoe.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("toy"))
    for router in moe_routers(model).values():
        experts = router.e_score_correction_bias.numel()
        router.e_score_correction_bias.copy_(
            torch.linspace(-0.03, 0.03, experts)[torch.randperm(experts)])
    return model.eval()


@torch.no_grad()
def capture_router_logits(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the model once on input_ids (B, T) and return {layer: router logits (B*T, E)}.

    The model runs in eval mode (no router noise); its training flag is restored after.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    vocab_size = model.cfg.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}); got "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, router in moe_routers(model).items():
        def hook(module, inputs, output, name=name):
            captured[name] = output.logits.detach().float().cpu()  # (B*T, E)
        handles.append(router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(input_ids.to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: captured[name] for name in moe_routers(model)}


def router_spec(router) -> dict:
    """The fixed routing settings of one Router, as plain numbers (what the page needs)."""
    return {
        "n_experts": router.n_experts,
        "top_k": router.top_k,
        "scoring_func": router.scoring_func,
        "n_group": router.n_group,
        "topk_group": router.topk_group,
        "group_score": router.group_score,
        "norm_topk_prob": bool(router.norm_topk_prob),
        "routed_scaling_factor": float(router.routed_scaling_factor),
        "use_expert_bias": bool(router.use_expert_bias),
        "bias": [float(b) for b in router.e_score_correction_bias.float().cpu()],
    }


def route(logits: torch.Tensor, spec: dict, settings: dict) -> dict:
    """Route one layer's logits (N, E) under the explorer's settings; plain-Python result.

    spec: router_spec(...) of the layer (group_score, norm_topk_prob, routed_scaling_factor,
    bias). settings: top_k, scoring_func, temperature, use_bias, bias_scale, n_group,
    topk_group, capacity_factor (0 = unlimited). Computes in float64, as the browser does.
    Returns experts / weights / kept (N, k) lists, tokens_per_expert, load (E,), max_vio,
    dropped_slots, dropped_fraction and capacity (None when unlimited).
    """
    check_settings(settings, spec["n_experts"])
    N, E = logits.shape
    k = settings["top_k"]
    scaled = logits.double() / settings["temperature"]  # (N, E)
    scores = scaled.softmax(dim=-1) if settings["scoring_func"] == "softmax" else scaled.sigmoid()
    bias = None
    if settings["use_bias"]:
        bias = torch.tensor(spec["bias"], dtype=torch.float64) * settings["bias_scale"]  # (E,)
    topk_idx = select_experts(scores, k, bias=bias, n_group=settings["n_group"],
                              topk_group=settings["topk_group"],
                              group_score=spec["group_score"])  # (N, k)
    weights = gate_weights(scores, topk_idx, norm_topk_prob=spec["norm_topk_prob"],
                           routed_scaling_factor=spec["routed_scaling_factor"])  # (N, k)
    capacity_factor = settings["capacity_factor"]
    keep = None
    if capacity_factor > 0:
        keep = balance.capacity_keep_mask(topk_idx, weights, E, capacity_factor)  # (N, k)
    stats = balance.router_stats(topk_idx, scores, E, keep_mask=keep)
    kept_slots = int(stats["tokens_per_expert"].sum())
    return {
        "experts": topk_idx.tolist(),
        "weights": weights.tolist(),
        "kept": (keep if keep is not None else torch.ones(N, k, dtype=torch.bool)).tolist(),
        "tokens_per_expert": stats["tokens_per_expert"].tolist(),
        "load": stats["load"].double().tolist(),
        "max_vio": stats["max_vio"],
        "dropped_slots": N * k - kept_slots,
        "dropped_fraction": stats["dropped_fraction"],
        "capacity": (balance.expert_capacity(N, k, E, capacity_factor)
                     if capacity_factor > 0 else None),
    }


def check_settings(settings: dict, n_experts: int) -> None:
    """A clear error naming the control when the settings cannot route E experts."""
    k, n_group, topk_group = settings["top_k"], settings["n_group"], settings["topk_group"]
    if not 1 <= k <= n_experts:
        raise ValueError(f"top_k must be in [1, {n_experts}] (the number of experts), got {k}")
    if settings["scoring_func"] not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, "
                         f"got {settings['scoring_func']!r}")
    if not settings["temperature"] > 0:
        raise ValueError(f"temperature must be > 0, got {settings['temperature']}")
    if settings["capacity_factor"] < 0:
        raise ValueError(f"capacity_factor must be >= 0 (0 = unlimited), "
                         f"got {settings['capacity_factor']}")
    if n_group < 1 or n_experts % n_group:
        raise ValueError(f"n_group must divide the {n_experts} experts, got {n_group}")
    if n_group > 1 and not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if n_group > 1 and topk_group * (n_experts // n_group) < k:
        raise ValueError(f"topk_group={topk_group} groups of {n_experts // n_group} experts "
                         f"hold fewer than top_k={k} experts")


def domain_batch(tokenizer, domains: Sequence[str] = data_lib.DOMAINS, tokens_per_domain: int = 64,
                 seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """(D, tokens_per_domain) token ids: the start of fresh documents of each domain.

    Documents come from minimoe.data's generators (seeded), encoded by `tokenizer`
    (anything with encode(str) -> list[int]).
    """
    rng = random.Random(seed)
    rows = []
    for domain in domains:
        ids: list[int] = []
        while len(ids) < tokens_per_domain:
            ids += tokenizer.encode(data_lib.generate_document(domain, rng) + "\n")
        rows.append(ids[:tokens_per_domain])
    return torch.tensor(rows, dtype=torch.long), list(domains)  # (D, T)


def domain_usage(experts: list, n_domains: int, n_experts: int) -> tuple[list, float]:
    """usage (D, E) lists and I(domain; expert) in nats from routed domain tokens.

    experts: the (D*T, k) expert lists of `route` on a domain batch, row-major by domain.
    """
    topk_idx = torch.tensor(experts, dtype=torch.long)  # (D*T, k)
    per_domain = topk_idx.shape[0] // n_domains
    topk_idx = topk_idx.view(n_domains, per_domain, -1)  # (D, T, k)
    labels = torch.arange(n_domains).unsqueeze(1).expand(n_domains, per_domain)  # (D, T)
    usage = viz.domain_expert_usage(topk_idx, labels, n_domains, n_experts)  # (D, E)
    information = viz.mutual_information(topk_idx, labels, n_domains, n_experts)
    return usage.tolist(), information


def explore(payload: dict, settings: dict) -> dict:
    """The explorer's whole result under `settings` (what `.result` holds, and the page).

    payload: see `build_payload`. Returns {"layer", "settings", "layers": {name: route(...)},
    "domains": {"names", "usage": {name: (D, E)}, "mutual_information": {name: nats},
    "max_mutual_information"} or None}.
    """
    layers, domains = {}, payload.get("domains")
    usage, information = {}, {}
    for name in payload["layer_names"]:
        spec = payload["specs"][name]
        logits = torch.tensor(payload["logits"][name], dtype=torch.float64)  # (N, E)
        layers[name] = route(logits, spec, settings)
        if domains is not None:
            domain_logits = torch.tensor(domains["logits"][name], dtype=torch.float64)
            no_capacity = dict(settings, capacity_factor=0.0)
            routed = route(domain_logits, spec, no_capacity)
            usage[name], information[name] = domain_usage(routed["experts"], len(domains["names"]),
                                                          spec["n_experts"])
    result = {"layer": settings["layer"], "settings": dict(settings), "layers": layers,
              "domains": None}
    if domains is not None:
        result["domains"] = {"names": list(domains["names"]), "usage": usage,
                             "mutual_information": information,
                             "max_mutual_information": math.log(len(domains["names"]))}
    return result


def build_payload(model, input_ids: torch.Tensor, tokens: list[str],
                  domain_ids: Optional[torch.Tensor] = None,
                  domain_names: Optional[list[str]] = None) -> dict:
    """Everything the front end needs, computed by the model once (JSON-ready).

    input_ids (1, T) with their display strings `tokens`; domain_ids (D, T') with
    domain_names, or None to leave out the per-domain panel. Logits are float32 values
    stored as Python floats, so Python and the browser start from the same numbers.
    """
    routers = moe_routers(model)
    logits = capture_router_logits(model, input_ids)
    payload = {
        "model_name": model.cfg.name,
        "tokens": list(tokens),
        "layer_names": list(routers),
        "specs": {name: router_spec(router) for name, router in routers.items()},
        "logits": {name: value.tolist() for name, value in logits.items()},
        "domains": None,
    }
    if domain_ids is not None:
        domain_logits = capture_router_logits(model, domain_ids)
        payload["domains"] = {"names": list(domain_names),
                              "logits": {n: v.tolist() for n, v in domain_logits.items()}}
    return payload


def default_settings(payload: dict, layer: Optional[str] = None) -> dict:
    """The model's own routing: its k, score function, groups and bias, T = 1, no capacity."""
    layer = layer or payload["layer_names"][-1]
    spec = payload["specs"][layer]
    return {"layer": layer, "top_k": spec["top_k"], "scoring_func": spec["scoring_func"],
            "temperature": 1.0, "use_bias": spec["use_expert_bias"], "bias_scale": 1.0,
            "n_group": spec["n_group"], "topk_group": spec["topk_group"],
            "capacity_factor": 0.0}
