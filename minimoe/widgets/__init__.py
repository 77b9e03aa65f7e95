"""Explorers: routing, balance, positions and FP8 you can move with a slider.

    from minimoe.widgets import RoutingExplorer, BalanceExplorer, PositionsExplorer, Fp8Explorer

Each explorer is a thin view over pure functions that the tests call on their own:

    RoutingExplorer    routing_data.py   one text through every MoE layer: top-1 expert per
                                         token, gate weights, loads, MaxVio, dropped slots,
                                         per-domain usage; controls for k, score function,
                                         temperature, bias, groups, capacity
    BalanceExplorer    balance_view.py   load and MaxVio over training, aux loss vs bias
    PositionsExplorer  positions_view.py RoPE / NTK / YaRN frequencies and score decay
    Fp8Explorer        fp8_view.py       per-tensor vs 1x128 vs 128x128 scaling errors

Why two kinds of widget. The routing explorer is an anywidget (ipywidgets 8 underneath):
its front end is one ES module, static/routing.js, that JupyterLab loads through anywidget
and that `RoutingExplorer.to_html` inlines into a single page, so the same code runs in a
notebook and in a static page with no kernel (the logits come from Python once; the module
recomputes everything after them). The other three need the package's torch functions on
every move (rope.py's frequencies, fp8.py's quantisers), so they are plain ipywidgets
sliders around a matplotlib figure; a reader without a kernel sees the static figure that
the notebooks draw just before them.
"""

from minimoe.widgets.routing import RoutingExplorer

__all__ = ["RoutingExplorer", "BalanceExplorer", "PositionsExplorer", "Fp8Explorer"]


def __getattr__(name):  # the matplotlib-based explorers load on first use
    if name == "BalanceExplorer":
        from minimoe.widgets.balance_view import BalanceExplorer
        return BalanceExplorer
    if name == "PositionsExplorer":
        from minimoe.widgets.positions_view import PositionsExplorer
        return PositionsExplorer
    if name == "Fp8Explorer":
        from minimoe.widgets.fp8_view import Fp8Explorer
        return Fp8Explorer
    raise AttributeError(f"module 'minimoe.widgets' has no attribute {name!r}")
