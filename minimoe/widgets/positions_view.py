"""PositionsExplorer: RoPE, partial RoPE, NTK and YaRN frequencies, and the score decay.

Frequencies come from minimoe.rope.RotaryEmbedding with each method's rope_scaling dict, so
the explorer shows exactly what the model uses. The decay curve is the attention score of
a query with an identical key at distance m (both all-ones head vectors, rotated with
minimoe.rope.apply_rotary, normalised by the head width):

    score(m) = (1 - p) + p * c^2 * mean_i cos(m f_i)

with p the rotated fraction of the head (partial RoPE) and c YaRN's cos/sin factor
(mscale; 1 for the other methods). The unrotated (1 - p) part never decays, which is
the point of partial RoPE; YaRN's c^2 is the temperature that lands in the scores.
"""

from __future__ import annotations

import ipywidgets
import torch

from minimoe.rope import RotaryEmbedding, apply_rotary
from minimoe.widgets.figure_view import FigureExplorer

METHODS = ("rope", "linear", "ntk", "yarn")


def rope_scaling(method: str, factor: float, original: int, beta_fast: float,
                 beta_slow: float) -> dict | None:
    """The rope_scaling dict (HF config form) of one method."""
    if method == "rope":
        return None
    if method == "yarn":
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                "beta_fast": beta_fast, "beta_slow": beta_slow}
    return {"type": "dynamic" if method == "dynamic" else method, "factor": factor}


def score_decay(rotary: RotaryEmbedding, head_dim: int, distances: torch.Tensor) -> torch.Tensor:
    """score(m) for m in distances: all-ones query and key, the key m positions earlier."""
    rotary_dim = rotary.rotary_dim
    ones = torch.ones(1, 1, 1, rotary_dim, dtype=torch.float64)  # (B, H, T, rotary_dim)
    cos, sin = rotary(distances)  # (M, rotary_dim) each
    cos0, sin0 = rotary(torch.zeros(1))  # (1, rotary_dim)
    query = apply_rotary(ones, cos0.double(), sin0.double())  # (1, 1, 1, rotary_dim) at 0
    keys = apply_rotary(ones.expand(1, 1, len(distances), rotary_dim), cos.double(),
                        sin.double())  # (1, 1, M, rotary_dim) at m: relative distance m
    rotated = (keys * query).sum(-1)[0, 0]  # (M,)
    return (rotated + (head_dim - rotary_dim)) / head_dim  # (M,)


def positions_curves(head_dim: int, rotary_fraction: float, theta: float, original: int,
                     factor: float, beta_fast: float, beta_slow: float,
                     max_distance: int) -> dict:
    """{method: {"inv_freq": (d/2,), "wavelength": (d/2,), "cos_sin_scale", "score": (M,)}}."""
    rotary_dim = max(2, int(round(head_dim * rotary_fraction / 2)) * 2)
    distances = torch.cat([torch.zeros(1), torch.logspace(0, torch.log10(torch.tensor(
        float(max_distance))), 400)]).round().unique()  # (M,) 0, then log-spaced
    curves = {"rotary_dim": rotary_dim, "distances": distances.tolist(), "methods": {}}
    for method in METHODS:
        rotary = RotaryEmbedding(rotary_dim, theta, original * factor,
                                 rope_scaling(method, factor, original, beta_fast, beta_slow))
        inv_freq = rotary.inv_freq.double()  # (rotary_dim/2,)
        curves["methods"][method] = {
            "inv_freq": inv_freq.tolist(),
            "wavelength": (2 * torch.pi / inv_freq).tolist(),
            "cos_sin_scale": rotary.cos_sin_scale,
            "yarn_low_high": (rotary.yarn_low, rotary.yarn_high),
            "score": score_decay(rotary, head_dim, distances).tolist(),
        }
    return curves


class PositionsExplorer(FigureExplorer):
    """Sliders for the YaRN parameters; DeepSeek-V3's numbers by default (d = 64 rotary)."""

    figsize = (12, 3.8)

    def __init__(self, head_dim: int = 64, theta: float = 10000.0, original: int = 4096,
                 factor: float = 40.0) -> None:
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        super().__init__({
            "head_dim": ipywidgets.IntSlider(value=head_dim, min=8, max=256, step=8,
                                             description="head dim", **slider),
            "rotary_fraction": ipywidgets.FloatSlider(value=1.0, min=0.125, max=1.0, step=0.125,
                                                      description="rotated fraction", **slider),
            "theta": ipywidgets.FloatLogSlider(value=theta, base=10, min=3, max=7, step=0.25,
                                               description="theta", **slider),
            "original": ipywidgets.IntSlider(value=original, min=128, max=16384, step=128,
                                             description="original length", **slider),
            "factor": ipywidgets.FloatSlider(value=factor, min=1.0, max=64.0, step=1.0,
                                             description="factor s", **slider),
            "beta_fast": ipywidgets.FloatSlider(value=32.0, min=2.0, max=64.0, step=1.0,
                                                description="beta_fast", **slider),
            "beta_slow": ipywidgets.FloatSlider(value=1.0, min=0.25, max=8.0, step=0.25,
                                                description="beta_slow", **slider),
            "max_distance": ipywidgets.IntSlider(value=original * 2, min=64, max=65536, step=64,
                                                 description="max distance", **slider),
        })

    def compute(self, **values) -> dict:
        return positions_curves(**values)

    def draw(self, result: dict, fig) -> None:
        freq_axis, decay_axis = fig.subplots(1, 2)
        for method, curve in result["methods"].items():
            freq_axis.plot(curve["wavelength"], marker=".", label=method)
            decay_axis.plot(result["distances"], curve["score"],
                            label=f"{method} (c = {curve['cos_sin_scale']:.3f})")
        low, high = result["methods"]["yarn"]["yarn_low_high"]
        freq_axis.axhline(self.values["original"], color="k", ls=":", lw=0.8)
        freq_axis.set(yscale="log", xlabel="pair i", ylabel="wavelength 2π / f_i (tokens)",
                      title=f"{result['rotary_dim']} rotated dims; YaRN ramp from pair "
                            f"{low:.0f} to {high:.0f} (dotted: L)")
        decay_axis.set(xscale="symlog", xlabel="distance m (tokens)",
                       ylabel="score(q, k) / head dim", title="score of identical q and k, m apart")
        for axis in (freq_axis, decay_axis):
            axis.legend(fontsize=8)
            axis.grid(alpha=0.3)
