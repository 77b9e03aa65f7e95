"""BalanceExplorer: load balance over training, auxiliary loss vs the aux-loss-free bias.

Reads notebook 02's committed experiment (notebooks/results/balance.json, written by
`python -m minimoe.experiments.balance`): for every run, MaxVio of each training batch
(mean over the MoE layers and per layer; Wang et al. 2024: (max load - mean load) / mean
load) and the validation loss. A step slider picks a moment of training; the explorer shows
the MaxVio curves up to it, each layer's MaxVio at that step (smoothed over `window` steps),
and each run's expert load at the end of training (the mean over domains of the committed
usage matrices: only the end is stored).
"""

from __future__ import annotations

import json
import os

import ipywidgets

from minimoe.widgets.figure_view import FigureExplorer

DEFAULT_RESULTS = os.path.join("notebooks", "results", "balance.json")
MOE_RUNS = ("aux-free", "aux-loss", "classic", "unbalanced")


def load_results(path: str = DEFAULT_RESULTS) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python -m minimoe.experiments.balance`")
    with open(path) as handle:
        return json.load(handle)


def window_mean(values: list, step_index: int, window: int) -> float:
    """Mean of values[step_index - window + 1 .. step_index] (fewer at the start)."""
    chunk = values[max(0, step_index - window + 1): step_index + 1]
    return sum(chunk) / len(chunk)


def balance_at_step(results: dict, step: int, window: int = 20,
                    runs: tuple = MOE_RUNS) -> dict:
    """Per run at training step `step`: smoothed MaxVio (mean and per layer), the latest
    validation loss, and the end-of-training expert load (mean of the domain usage rows)."""
    answer = {}
    for name in runs:
        if name not in results["runs"]:
            continue
        run = results["runs"][name]
        index = max(i for i, s in enumerate(run["step"]) if s <= step) if step >= run["step"][0] else 0
        evaluated = [i for i, s in enumerate(run["val_step"]) if s <= step]
        final_load = {layer: [sum(column) / len(column) for column in zip(*rows)]
                      for layer, rows in run["usage"].items()}
        answer[name] = {
            "step": run["step"][index],
            "max_vio": window_mean(run["max_vio"], index, window),
            "max_vio_by_layer": {layer: window_mean(values, index, window)
                                 for layer, values in run["max_vio_by_layer"].items()},
            "val_loss": run["val_loss"][evaluated[-1]] if evaluated else None,
            "final_load": final_load,
        }
    return answer


class BalanceExplorer(FigureExplorer):
    """Step slider over notebook 02's balance runs (results: the loaded balance.json)."""

    figsize = (12, 3.6)

    def __init__(self, results: dict | None = None, window: int = 20) -> None:
        self.results = results if results is not None else load_results()
        self.window = window
        last = max(self.results["runs"]["aux-free"]["step"])
        super().__init__({
            "step": ipywidgets.IntSlider(value=last, min=0, max=last, step=10,
                                         description="step", continuous_update=False),
            "run": ipywidgets.Dropdown(options=[r for r in MOE_RUNS if r in self.results["runs"]],
                                       value="aux-free", description="load of"),
        })

    def compute(self, step: int, run: str) -> dict:
        return {"step": step, "run": run,
                "runs": balance_at_step(self.results, step, self.window)}

    def draw(self, result: dict, fig) -> None:
        curves, layers, loads = fig.subplots(1, 3)
        step = result["step"]
        for name, at in result["runs"].items():
            run = self.results["runs"][name]
            upto = [i for i, s in enumerate(run["step"]) if s <= step]
            smooth = [window_mean(run["max_vio"], i, self.window) for i in upto]
            curves.plot([run["step"][i] for i in upto], smooth, label=f"{name}: {at['max_vio']:.2f}")
        curves.set(xlabel="training step", ylabel=f"MaxVio (mean of {self.window} steps)",
                   title=f"MaxVio up to step {step}", yscale="log")
        curves.legend(fontsize=8)
        names = list(result["runs"])
        layer_names = list(result["runs"][names[0]]["max_vio_by_layer"])
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            values = [result["runs"][name]["max_vio_by_layer"][layer] for layer in layer_names]
            layers.bar([i + j * width for i in range(len(layer_names))], values, width, label=name)
        layers.set_xticks([i + 0.4 - width / 2 for i in range(len(layer_names))], layer_names)
        layers.set(ylabel="MaxVio", title=f"each MoE layer at step {step}")
        loads_of = result["runs"][result["run"]]["final_load"]
        for layer, load in loads_of.items():
            loads.plot(range(len(load)), load, marker="o", label=layer)
        loads.axhline(1 / len(next(iter(loads_of.values()))), color="k", ls="--", lw=0.8)
        loads.set(xlabel="expert", ylabel="share of token-slots",
                  title=f"{result['run']}: load at the end (dashed: 1/E)")
        loads.legend(fontsize=8)
