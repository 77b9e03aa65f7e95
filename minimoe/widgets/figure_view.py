"""The shared shape of the matplotlib explorers: controls, a pure function, a figure.

A FigureExplorer holds ipywidgets controls, calls its pure `compute(**values)` whenever one
moves, keeps the answer in `.result` (so Python and the tests can read what is drawn) and
redraws a matplotlib figure from it into an Output area.
"""

from __future__ import annotations

import ipywidgets


class FigureExplorer(ipywidgets.VBox):
    """controls: {name: ipywidgets value widget}; compute(**values) -> result; draw(result, fig)."""

    figsize = (10, 3.6)

    def __init__(self, controls: dict) -> None:
        self.controls = controls
        self.output = ipywidgets.Output()
        rows = [ipywidgets.HBox(list(controls.values())[i:i + 3])
                for i in range(0, len(controls), 3)]
        super().__init__(rows + [self.output])
        self.result = None
        for control in controls.values():
            control.observe(self._update, names="value")
        self._update()

    @property
    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def compute(self, **values) -> dict:
        raise NotImplementedError

    def draw(self, result: dict, fig) -> None:
        raise NotImplementedError

    def _update(self, change=None) -> None:
        import matplotlib.pyplot as plt

        self.result = self.compute(**self.values)
        with self.output:
            self.output.clear_output(wait=True)
            fig = plt.figure(figsize=self.figsize)
            self.draw(self.result, fig)
            fig.tight_layout()
            plt.show()
