"""OGIP FITS spectral files (PHA type I, ARF, RMF): `read` for ingestion, `write` for the simulator."""
