"""Where spectra come from: the canonical detection schema, pipeline products, the two archives."""
