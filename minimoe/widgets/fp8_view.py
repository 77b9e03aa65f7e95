"""Fp8Explorer: a tensor with outliers, scaled per tensor, per 1x128 tile, per 128x128 block.

The tensor: standard normal entries, a fraction `outlier_rate` of them multiplied by
`outlier_factor` (activation outliers, as in LLM.int8 and the DeepSeek-V3 report §3.3.1).
Each scheme quantises with minimoe.fp8 (quantize_per_tensor, quantize_act_1x128,
quantize_weight_128x128) and dequantises; the error is measured on the ORDINARY entries,
relative to their norm, because that is what an outlier ruins: one scale per tensor is
set by the largest value, and small values fall into the subnormals or to zero.
"""

from __future__ import annotations

import ipywidgets
import torch

from minimoe import fp8
from minimoe.widgets.figure_view import FigureExplorer

SCHEMES = {
    "per-tensor": (fp8.quantize_per_tensor, fp8.dequantize_per_tensor),
    "1x128 tiles": (fp8.quantize_act_1x128, fp8.dequantize_act_1x128),
    "128x128 blocks": (fp8.quantize_weight_128x128, fp8.dequantize_weight_128x128),
}


def outlier_tensor(tokens: int, channels: int, outlier_rate: float, outlier_factor: float,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, is_outlier), both (tokens, channels)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, channels, generator=generator)  # (T, C)
    is_outlier = torch.rand(tokens, channels, generator=generator) < outlier_rate  # (T, C)
    return torch.where(is_outlier, base * outlier_factor, base), is_outlier


def scaling_errors(x: torch.Tensor, is_outlier: torch.Tensor, fmt: str = "e4m3",
                   scale_fmt: str = "fp32") -> dict:
    """{scheme: {"relative", "zero_fraction", "row_relative" (T,)}} on the ordinary entries."""
    normal = ~is_outlier
    answer = {}
    for name, (quantise, dequantise) in SCHEMES.items():
        q, scale = quantise(x, scale_fmt=scale_fmt, fmt=fmt)
        x_deq = dequantise(q, scale)  # (T, C)
        error = torch.where(normal, x_deq - x, torch.zeros_like(x))  # (T, C)
        reference = torch.where(normal, x, torch.zeros_like(x))  # (T, C)
        answer[name] = {
            "relative": float(error.norm() / reference.norm()),
            "zero_fraction": float((x_deq[normal] == 0).float().mean()),
            "row_relative": (error.norm(dim=1) / reference.norm(dim=1).clamp_min(1e-30)).tolist(),
        }
    return answer


class Fp8Explorer(FigureExplorer):
    """Outlier size and rate, FP8 format and scale format; errors of the three scalings."""

    figsize = (11, 3.6)

    def __init__(self, tokens: int = 256, channels: int = 1024) -> None:
        self.tokens, self.channels = tokens, channels
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        super().__init__({
            "outlier_factor": ipywidgets.FloatLogSlider(value=3e4, base=10, min=0, max=6,
                                                        step=0.25, description="outlier x", **slider),
            "outlier_rate": ipywidgets.FloatLogSlider(value=1e-3, base=10, min=-5, max=-1,
                                                      step=0.5, description="outlier rate", **slider),
            "fmt": ipywidgets.Dropdown(options=["e4m3", "e5m2"], value="e4m3", description="format"),
            "scale_fmt": ipywidgets.Dropdown(options=["fp32", "ue8m0"], value="fp32",
                                             description="scales"),
        })

    def compute(self, outlier_factor: float, outlier_rate: float, fmt: str, scale_fmt: str) -> dict:
        x, is_outlier = outlier_tensor(self.tokens, self.channels, outlier_rate, outlier_factor)
        return {"outliers": int(is_outlier.sum()),
                "errors": scaling_errors(x, is_outlier, fmt, scale_fmt)}

    def draw(self, result: dict, fig) -> None:
        bars, rows = fig.subplots(1, 2)
        names = list(result["errors"])
        values = [result["errors"][n]["relative"] for n in names]
        bars.bar(names, values, color=["C0", "C1", "C2"])
        for i, v in enumerate(values):
            bars.annotate(f"{100 * v:.1f}%", (i, v), ha="center", va="bottom", fontsize=9)
        bars.set(yscale="log", ylabel="relative error of the ordinary entries",
                 title=f"{result['outliers']} outliers in {self.tokens} x {self.channels}")
        for name in names:
            rows.plot(result["errors"][name]["row_relative"], lw=0.8, label=name)
        rows.set(yscale="log", xlabel="row (token)", ylabel="relative error of the row",
                 title="row by row: a tile's scale only sees its own outliers")
        rows.legend(fontsize=8)
