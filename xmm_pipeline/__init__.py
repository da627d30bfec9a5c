"""xmm_pipeline: XMM-Newton EPIC-pn spectra to a searchable latent map."""

__version__ = "0.1.0"
