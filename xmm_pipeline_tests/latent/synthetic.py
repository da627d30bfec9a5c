"""Synthetic embeddings for the latent tests: Gaussian clusters per class, several detections per
source (some moving along a line), a few far-off odd points with bad reconstructions."""

from __future__ import annotations

import numpy as np
import pandas as pd

from xmm_pipeline.latent.embed import embeddings_frame

CLASS_CENTRES = {"AGN": (0.0, 0.0), "star": (4.0, 0.0), "XRB": (0.0, 4.0), "TDE": (8.0, 6.0)}


def synthetic_embeddings(
    n_sources: int = 200, detections_per_source: int = 3, n_odd: int = 5, seed: int = 0, dim: int = 2
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(embeddings, classes). Movers: the XRB and TDE sources walk 1.5 units per detection. Hardness
    ratios carry the class only weakly (class offset 0.15, noise 0.3), as a blunt summary would."""
    rng = np.random.default_rng(seed)
    names = list(CLASS_CENTRES)
    rows, mus, classes = [], [], []
    detid = 100_000_000
    for source in range(n_sources):
        name = names[source % len(names)]
        centre = np.zeros(dim)
        centre[:2] = CLASS_CENTRES[name]
        centre += rng.normal(0, 0.3, dim)
        moving = name in ("XRB", "TDE")
        for det in range(detections_per_source):
            detid += 1
            step = np.zeros(dim)
            if moving:
                step[0] = 1.5 * det
            mus.append(centre + step + rng.normal(0, 0.05, dim))
            hardness = np.tanh(0.15 * names.index(name) - 0.2 + rng.normal(0, 0.3, 4))
            rows.append({"detid": detid, "srcid": 200_000 + source, "iauname": f"4XMM J{source:06d}.0+000000",
                         "obs_id": f"{det:010d}", "mjd": 52000.0 + 100 * det + rng.uniform(0, 10),
                         "ra": rng.uniform(0, 360), "dec": rng.uniform(-80, 80), "net_counts": 1000.0,
                         **{f"ep_hr{i + 1}": hardness[i] for i in range(4)}})
            classes.append({"detid": detid, "srcid": 200_000 + source, "class": name, "is_odd": False})
    for odd in range(n_odd):
        detid += 1
        mus.append(np.full(dim, 20.0 + 3 * odd))
        rows.append({"detid": detid, "srcid": 300_000 + odd, "iauname": f"4XMM J9{odd:05d}.0+000000",
                     "obs_id": "0999999999", "mjd": 53000.0, "ra": 10.0, "dec": 10.0, "net_counts": 500.0,
                     **{f"ep_hr{i + 1}": 0.0 for i in range(4)}})
        classes.append({"detid": detid, "srcid": 300_000 + odd, "class": "odd", "is_odd": True})
    meta = pd.DataFrame(rows)
    mu = np.asarray(mus)
    deviance = rng.gamma(20, 1 / 20, len(meta))
    deviance[-n_odd:] = 5.0 + np.arange(n_odd) if n_odd else deviance[-n_odd:]
    frame = embeddings_frame(meta, mu, np.full_like(mu, -3.0), deviance, "synthetic-v1")
    return frame, pd.DataFrame(classes)
