"""The energy grids: the channel grid spectra are binned onto, and the wider model grid they are fitted on.

The channel grid (`EnergyGrid`, 238 logarithmic bins over 0.3-10 keV by default) is where counts,
background, the validity mask and the encoder's unfolded input live. The model grid (`ModelGrid`) is the
same grid extended by whole logarithmic steps below and above, to MODEL_E_MIN_KEV-MODEL_E_MAX_KEV by
default: the response redistributes photons from outside 0.3-10 keV into the band's edge channels
(a 0.1 keV blackbody gets ~10% of its 0.3 keV counts from below 0.3 keV, a power law ~25% of its
9.9 keV counts from above 10 keV), so the decoder's photon flux and the area x exposure are defined on
the model grid and the compressed response maps model bins to channel bins. Its inner edges are the
channel grid's own, so model bin `bins_below + k` is channel bin k. Measured on the real pn responses
(docs/DATA.md): 0.2 keV and 11 keV suffice for a 50 eV blackbody and a power law to fold within 0.5%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MODEL_E_MIN_KEV = 0.2
MODEL_E_MAX_KEV = 12.0


class _BinsFromEdges:
    """Logarithmic bin centres and widths of a grid that defines `edges_kev`."""

    edges_kev: np.ndarray

    @property
    def centres_kev(self) -> np.ndarray:
        edges = self.edges_kev
        return np.sqrt(edges[:-1] * edges[1:])

    @property
    def widths_kev(self) -> np.ndarray:
        return np.diff(self.edges_kev)


@dataclass(frozen=True)
class EnergyGrid(_BinsFromEdges):
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
    def log_step(self) -> float:
        """ln(edges[k+1] / edges[k]), the same for every bin."""
        return math.log(self.e_max_kev / self.e_min_kev) / self.n_bins

    def bin_index(self, energy_kev: np.ndarray) -> np.ndarray:
        """Bin of each energy (edges[k] <= E < edges[k+1]); -1 outside the grid."""
        index = np.searchsorted(self.edges_kev, energy_kev, side="right") - 1
        return np.where((index >= 0) & (index < self.n_bins), index, -1)

    def extended(self, e_min_kev: float = MODEL_E_MIN_KEV, e_max_kev: float = MODEL_E_MAX_KEV) -> ModelGrid:
        """The model grid: this grid extended by whole log steps until it covers e_min_kev-e_max_kev."""
        if not (0 < e_min_kev <= self.e_min_kev and e_max_kev >= self.e_max_kev):
            raise ValueError(
                f"a model grid must contain the channel grid {self.e_min_kev}-{self.e_max_kev} keV, "
                f"got {e_min_kev}-{e_max_kev}"
            )
        below = math.ceil(math.log(self.e_min_kev / e_min_kev) / self.log_step - 1e-9)
        above = math.ceil(math.log(e_max_kev / self.e_max_kev) / self.log_step - 1e-9)
        return ModelGrid(self, below, above)


@dataclass(frozen=True)
class ModelGrid(_BinsFromEdges):
    """The channel grid plus `bins_below` and `bins_above` bins of the same log step (see module doc)."""

    channel: EnergyGrid
    bins_below: int = 0
    bins_above: int = 0

    def __post_init__(self) -> None:
        if self.bins_below < 0 or self.bins_above < 0:
            raise ValueError(f"model grid extensions must be >= 0, got {self.bins_below}, {self.bins_above}")

    @classmethod
    def same_as(cls, channel: EnergyGrid) -> ModelGrid:
        """No extension: the model grid of spectra tables and models made before the wider grid."""
        return cls(channel, 0, 0)

    @property
    def n_bins(self) -> int:
        return self.bins_below + self.channel.n_bins + self.bins_above

    @property
    def channel_slice(self) -> slice:
        """The model bins that are the channel grid's bins."""
        return slice(self.bins_below, self.bins_below + self.channel.n_bins)

    @property
    def edges_kev(self) -> np.ndarray:
        inner = self.channel.edges_kev
        step = self.channel.log_step
        below = inner[0] * np.exp(-step * np.arange(self.bins_below, 0, -1))
        above = inner[-1] * np.exp(step * np.arange(1, self.bins_above + 1))
        return np.concatenate([below, inner, above])

    @property
    def e_min_kev(self) -> float:
        return float(self.edges_kev[0])

    @property
    def e_max_kev(self) -> float:
        return float(self.edges_kev[-1])

    def to_dict(self) -> dict[str, Any]:
        return {"channel": {"e_min_kev": self.channel.e_min_kev, "e_max_kev": self.channel.e_max_kev,
                            "n_bins": self.channel.n_bins},
                "bins_below": self.bins_below, "bins_above": self.bins_above}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelGrid:
        return cls(EnergyGrid(**values["channel"]), int(values["bins_below"]), int(values["bins_above"]))


DEFAULT_GRID = EnergyGrid()
DEFAULT_MODEL_GRID = DEFAULT_GRID.extended()
