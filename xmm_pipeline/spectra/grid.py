"""The energy grid every spectrum is binned onto: 238 logarithmic bins over 0.3-10 keV by default."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EnergyGrid:
    e_min_kev: float = 0.3
    e_max_kev: float = 10.0
    n_bins: int = 238

    def __post_init__(self) -> None:
        if not (0 < self.e_min_kev < self.e_max_kev):
            raise ValueError(
                f"energy grid needs 0 < e_min_kev < e_max_kev, got {self.e_min_kev}, {self.e_max_kev}"
            )
        if self.n_bins < 2:
            raise ValueError(f"energy grid needs n_bins >= 2, got {self.n_bins}")

    @property
    def edges_kev(self) -> np.ndarray:
        return np.geomspace(self.e_min_kev, self.e_max_kev, self.n_bins + 1)

    @property
    def centres_kev(self) -> np.ndarray:
        edges = self.edges_kev
        return np.sqrt(edges[:-1] * edges[1:])

    @property
    def widths_kev(self) -> np.ndarray:
        return np.diff(self.edges_kev)

    def bin_index(self, energy_kev: np.ndarray) -> np.ndarray:
        """Bin of each energy (edges[k] <= E < edges[k+1]); -1 outside the grid."""
        index = np.searchsorted(self.edges_kev, energy_kev, side="right") - 1
        return np.where((index >= 0) & (index < self.n_bins), index, -1)


DEFAULT_GRID = EnergyGrid()
