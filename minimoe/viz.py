"""Seeing the router: which experts each kind of text goes to.

The idea
--------
A router is a learned classifier over experts, applied to every token at every MoE layer.
Whether experts *specialise* is an empirical question, answered by counting: run text of
known origin through the model, record each token's top-k experts, and tabulate

    usage[d, e] = (token-slots of domain d routed to expert e) / (token-slots of domain d)

per layer. A row of usage is a distribution over experts; if experts specialised, rows of
different domains differ. One number summarises it: the mutual information between the
domain of a token and the expert it is routed to,

    I(D; E) = sum_{d,e} p(d, e) log( p(d, e) / (p(d) p(e)) )     (nats)

which is 0 when routing ignores the domain and at most min(log |D|, log |E|). OLMoE
(Muennighoff et al. 2024, §5 "domain specialization") and DeepSeekMoE (Dai et al. 2024)
make the same measurement on real data; on this toy corpus the domains differ even at the
byte level (Arabic script is multi-byte UTF-8, arithmetic is digits), so some
specialisation appears within minutes of training.

What the reader should notice: balance and specialisation pull in opposite directions. A
perfectly balanced router that ignored content would have I(D; E) = 0; DeepSeek-V3 §4.5.2
credits the auxiliary-loss-free bias for leaving more room to specialise than an
auxiliary loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


@torch.no_grad()
def collect_routing(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the model once and return {MoE layer name: top-k expert ids (B, T, k)}."""
    from minimoe.moe import MoE

    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, MoE) and not name.startswith("mtp"):
            def hook(router, inputs, output, name=name):
                captured[name] = output.topk_idx  # (N, k) with N = B * T
            handles.append(module.gate.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(input_ids)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    B, T = input_ids.shape
    return {name.removesuffix(".mlp"): idx.view(B, T, -1) for name, idx in captured.items()}


def domain_expert_usage(topk_idx: torch.Tensor, domains: torch.Tensor, num_domains: int,
                        num_experts: int) -> torch.Tensor:
    """usage (D, E): fraction of each domain's token-slots going to each expert.

    topk_idx (B, T, k) expert ids; domains (B, T) domain index of each token.
    """
    slot_domains = domains.unsqueeze(-1).expand_as(topk_idx).reshape(-1)  # (B*T*k,)
    slot_experts = topk_idx.reshape(-1)  # (B*T*k,)
    counts = torch.zeros(num_domains, num_experts, dtype=torch.float64)
    counts.index_put_((slot_domains.long(), slot_experts.long()),
                      torch.ones_like(slot_experts, dtype=torch.float64), accumulate=True)
    totals = counts.sum(dim=1, keepdim=True).clamp_min(1.0)  # (D, 1)
    return counts / totals  # (D, E)


def mutual_information(topk_idx: torch.Tensor, domains: torch.Tensor, num_domains: int,
                       num_experts: int) -> float:
    """I(domain; expert) in nats over all token-slots (see the module docstring)."""
    slot_domains = domains.unsqueeze(-1).expand_as(topk_idx).reshape(-1).long()
    slot_experts = topk_idx.reshape(-1).long()
    joint = torch.zeros(num_domains, num_experts, dtype=torch.float64)
    joint.index_put_((slot_domains, slot_experts),
                     torch.ones_like(slot_experts, dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    p_domain = joint.sum(dim=1, keepdim=True)  # (D, 1)
    p_expert = joint.sum(dim=0, keepdim=True)  # (1, E)
    mask = joint > 0
    ratio = joint[mask] / (p_domain.expand_as(joint)[mask] * p_expert.expand_as(joint)[mask])
    return float((joint[mask] * torch.log(ratio)).sum())


def routing_report(model, input_ids: torch.Tensor, domains: torch.Tensor,
                   domain_names: tuple[str, ...]) -> dict:
    """Per-layer usage matrices and I(domain; expert), plus a printable table."""
    num_experts = model.cfg.n_routed_experts + model.cfg.n_zero_experts
    routing = collect_routing(model, input_ids)
    layers = {}
    for name, topk_idx in routing.items():
        layers[name] = {
            "usage": domain_expert_usage(topk_idx, domains, len(domain_names), num_experts),
            "mutual_information": mutual_information(topk_idx, domains, len(domain_names),
                                                     num_experts),
        }
    return {"layers": layers, "domain_names": tuple(domain_names),
            "max_mutual_information": math.log(min(len(domain_names), num_experts))}


def format_usage_table(report: dict, layer: Optional[str] = None, top: int = 3) -> str:
    """Markdown table: for each domain, its `top` most used experts and their shares."""
    names = list(report["layers"])
    if not names:
        return "(no MoE layers)"
    layer = layer or names[-1]
    usage = report["layers"][layer]["usage"]
    lines = [f"Expert usage by domain, {layer} "
             f"(I(domain; expert) = {report['layers'][layer]['mutual_information']:.3f} nats, "
             f"max {report['max_mutual_information']:.3f}; uniform share "
             f"{100 / usage.shape[1]:.1f}%)",
             "", "| domain | top experts (share of the domain's token-slots) |", "|---|---|"]
    for d, domain in enumerate(report["domain_names"]):
        shares, experts = torch.topk(usage[d], min(top, usage.shape[1]))
        cells = ", ".join(f"e{int(e)} {100 * float(s):.0f}%" for s, e in zip(shares, experts))
        lines.append(f"| {domain} | {cells} |")
    return "\n".join(lines)


def information_label(information: float, num_domains: int, num_experts: int) -> str:
    """'I = 0.28 nats of max ln 5 = 1.61': the value, its unit and its ceiling."""
    ceiling = min(num_domains, num_experts)
    return f"I = {information:.2f} nats of max ln {ceiling} = {math.log(ceiling):.2f}"


def plot_domain_usage(report: dict, path: Optional[str] = None, title: str = ""):
    """Heatmaps (domains x experts) for every MoE layer; saved to `path` when given.

    All panels share one colour scale (0 to the largest share in any layer) and one colour
    bar, so a colour means the same share in every layer; each panel states I(domain;
    expert) in nats and its maximum ln(min(|D|, |E|)).
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(report["layers"])
    usages = [torch.as_tensor(report["layers"][name]["usage"]).numpy() for name in names]
    top = max(float(usage.max()) for usage in usages)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names) + 0.8, 2.9), squeeze=False,
                             layout="constrained")
    for ax, name, usage in zip(axes[0], names, usages):
        image = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        label = information_label(report["layers"][name]["mutual_information"],
                                  usage.shape[0], usage.shape[1])
        ax.set_title(f"{name}\n{label}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(report["domain_names"])))
        ax.set_yticklabels(report["domain_names"], fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02,
                 label="share of the domain's token-slots")
    fig.suptitle(title or "Share of each domain's token-slots per expert", fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
