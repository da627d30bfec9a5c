"""The one interface both archives implement.

Each archive materialises the same layout under a local root, so ingestion never knows which archive
the files came from:

    root/catalogue.parquet                        the detection catalogue, canonical schema
    root/<obs_id>/pps/P<obs_id>PNS003SRSPEC0<HHH>.FTZ   (and BGSPEC, SRCARF) pipeline products
    root/responses/PN/<canned rmf>                the canned RMFs named by the spectra's RESPFILE
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from xmm_pipeline.storage import QuarantineRecord

CATALOGUE_FILE = "catalogue.parquet"
RESPONSES_SUBDIR = Path("responses") / "PN"


class Archive(ABC):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @abstractmethod
    def release_fingerprint(self) -> str:
        """A string that changes when, and only when, the catalogue release changes."""

    @abstractmethod
    def fetch_catalogue(self) -> pd.DataFrame:
        """The detection catalogue in the canonical schema; also written to root/catalogue.parquet."""

    @abstractmethod
    def fetch_observations(self, obs_ids: Sequence[str]) -> list[QuarantineRecord]:
        """Make the pn spectral products of these observations, and the RMFs they name, present under
        root. Returns what could not be had (each with its reason); the rest is in place."""

    def observation_dir(self, obs_id: str) -> Path:
        return self.root / obs_id / "pps"

    def responses_dir(self) -> Path:
        return self.root / RESPONSES_SUBDIR
