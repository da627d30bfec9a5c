"""How well the model represents a spectrum, against the spectra of the latent map.

A latent vector is only as meaningful as the reconstruction behind it: the neighbours of a spectrum the
decoder cannot reproduce (a deviance/dof far above that of the training set: a source class, a mode or
a brightness the model never saw) are neighbours of a poor fit, not of the spectrum. The reference is
the `deviance_per_dof` column of the embeddings table (latent/embed.py), one value per embedded
detection, computed by the same model in the same way as for a user's spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmm_pipeline.errors import UserError

# A spectrum that fits worse than all but this share of the map's spectra is beyond what the training
# set holds: with 10^3-10^5 spectra the last 1% are already the map's own outliers.
BEYOND_SHARE = 0.01


@dataclass(frozen=True)
class FitQuality:
    """A spectrum's deviance/dof and where it falls among the reference spectra's."""

    deviance_per_dof: float
    share_worse: float  # fraction of reference spectra whose deviance/dof is larger
    n_reference: int
    reference_median: float
    reference_max: float

    @property
    def beyond_training(self) -> bool:
        """True when fewer than BEYOND_SHARE of the reference spectra fit worse (or it is not finite)."""
        return not np.isfinite(self.deviance_per_dof) or self.share_worse < BEYOND_SHARE

    def line(self) -> str:
        """One line for the user: the value, the share of the map's spectra that fit worse."""
        return (
            f"fit: deviance/dof {self.deviance_per_dof:.4g}; {100 * self.share_worse:.1f}% of the "
            f"{self.n_reference} spectra in the latent map fit worse "
            f"(their median {self.reference_median:.3g}, worst {self.reference_max:.3g})"
        )

    def warning(self) -> str | None:
        """A warning when the model cannot represent the spectrum as it does the training set, else None."""
        if not self.beyond_training:
            return None
        return (
            f"warning: deviance/dof {self.deviance_per_dof:.4g} is beyond what the training set holds "
            f"(fewer than {100 * BEYOND_SHARE:g}% of its spectra fit worse): the model cannot represent "
            "this spectrum, so its neighbours are not similar spectra"
        )


def fit_quality(deviance_per_dof: float, reference_deviance_per_dof: np.ndarray) -> FitQuality:
    """Place one spectrum's deviance/dof among the reference (e.g. the embeddings table's column)."""
    reference = np.asarray(reference_deviance_per_dof, dtype=np.float64).ravel()
    reference = reference[np.isfinite(reference)]
    if len(reference) == 0:
        raise UserError("no finite deviance_per_dof among the embedded spectra: cannot judge the fit")
    value = float(deviance_per_dof)
    share = float(np.mean(reference > value)) if np.isfinite(value) else 0.0
    return FitQuality(
        deviance_per_dof=value,
        share_worse=share,
        n_reference=len(reference),
        reference_median=float(np.median(reference)),
        reference_max=float(reference.max()),
    )
