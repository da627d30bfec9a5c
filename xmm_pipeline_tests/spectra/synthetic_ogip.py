"""Small OGIP products written with astropy for the preprocessing tests.

A Gaussian-redistribution RMF on the pn channel grid (4096 x 5 eV), smooth pn-like ARFs, and PPS-named
spectra in an archive layout (catalogue.parquet, <obs_id>/pps/*.FTZ, responses/PN/*.rmf), so the
tests can break files at will without touching the real ones.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

from xmm_pipeline.archive.catalogue import CANONICAL_COLUMNS, as_canonical

N_CHANNELS = 4096
CHANNEL_KEV = 0.005
RMF_NAME = "epn_e3_ff20_sdY9.rmf"  # what RESPFILE says; the file on disk carries a version
RMF_FILE = "epn_e3_ff20_sdY9_v21.0.rmf"


def energy_edges_kev() -> np.ndarray:
    return np.round(np.arange(0.05, 12.0 + 1e-9, 0.01), 6)


def write_rmf(path: Path) -> None:
    edges = energy_edges_kev()
    lo, hi = edges[:-1], edges[1:]
    mid = 0.5 * (lo + hi)
    sigma = 0.042 * np.sqrt(mid / 0.5) ** 0.6
    channel_mid = (np.arange(N_CHANNELS) + 0.5) * CHANNEL_KEV
    first, n_chan, values = [], [], []
    for energy, width in zip(mid, sigma):
        start = max(int((energy - 5 * width) / CHANNEL_KEV), 0)
        stop = min(int((energy + 5 * width) / CHANNEL_KEV) + 1, N_CHANNELS)
        profile = np.exp(-0.5 * ((channel_mid[start:stop] - energy) / width) ** 2)
        first.append(start)
        n_chan.append(stop - start)
        values.append((profile / profile.sum()).astype(np.float32))
    matrix = fits.BinTableHDU.from_columns(
        [
            fits.Column("ENERG_LO", "E", array=lo),
            fits.Column("ENERG_HI", "E", array=hi),
            fits.Column("N_GRP", "I", array=np.ones(len(lo), dtype=np.int16)),
            fits.Column("F_CHAN", "1I", array=np.array(first, dtype=np.int16)),
            fits.Column("N_CHAN", "1I", array=np.array(n_chan, dtype=np.int16)),
            fits.Column("MATRIX", "PE()", array=np.array(values, dtype=object)),
        ],
        name="MATRIX",
    )
    matrix.header.update({"HDUCLASS": "OGIP", "HDUCLAS1": "RESPONSE", "HDUCLAS2": "RSP_MATRIX"})
    matrix.header.update({"HDUCLAS3": "REDIST", "DETCHANS": N_CHANNELS, "CHANTYPE": "PI", "TLMIN4": 0})
    channels = np.arange(N_CHANNELS)
    ebounds = fits.BinTableHDU.from_columns(
        [
            fits.Column("CHANNEL", "I", array=channels.astype(np.int16)),
            fits.Column("E_MIN", "E", array=channels * CHANNEL_KEV),
            fits.Column("E_MAX", "E", array=(channels + 1) * CHANNEL_KEV),
        ],
        name="EBOUNDS",
    )
    ebounds.header.update({"DETCHANS": N_CHANNELS, "CHANTYPE": "PI"})
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([fits.PrimaryHDU(), matrix, ebounds]).writeto(path, overwrite=True)


def pn_like_area_cm2(
    energy_kev: np.ndarray, pn_filter: str = "Thin1", off_axis_arcmin: float = 0.0
) -> np.ndarray:
    """A smooth pn-like effective area with a filter-dependent soft cut-off and vignetting."""
    log_e = np.log(energy_kev)
    area = 1300 * np.exp(-0.5 * ((log_e - np.log(1.5)) / 1.1) ** 2)
    filter_depth = {"Thin1": 0.08, "Medium": 0.2, "Thick": 0.6}[pn_filter]
    area *= np.exp(-filter_depth * energy_kev**-2.5)
    return area * (1 - 0.04 * off_axis_arcmin * (1 + energy_kev / 10))


def _gzipped(hdus: fits.HDUList) -> bytes:
    buffer = io.BytesIO()
    hdus.writeto(buffer)
    return gzip.compress(buffer.getvalue(), mtime=0)


def write_arf(path: Path, area_cm2: np.ndarray) -> None:
    edges = energy_edges_kev()
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column("ENERG_LO", "E", array=edges[:-1]),
            fits.Column("ENERG_HI", "E", array=edges[1:]),
            fits.Column("SPECRESP", "E", array=area_cm2, unit="cm**2"),
        ],
        name="SPECRESP",
    )
    table.header.update({"HDUCLASS": "OGIP", "HDUCLAS1": "RESPONSE", "HDUCLAS2": "SPECRESP"})
    path.write_bytes(_gzipped(fits.HDUList([fits.PrimaryHDU(), table])))


def write_pha(
    path: Path, counts: np.ndarray, exposure_s: float, backscal: float, links: dict[str, str]
) -> None:
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column("CHANNEL", "I", array=np.arange(len(counts), dtype=np.int16)),
            fits.Column("COUNTS", "J", array=np.asarray(counts, dtype=np.int32)),
            fits.Column("QUALITY", "I", array=np.zeros(len(counts), dtype=np.int16)),
        ],
        name="SPECTRUM",
    )
    table.header.update(
        {"HDUCLASS": "OGIP", "HDUCLAS1": "SPECTRUM", "HDUCLAS2": "TOTAL", "HDUCLAS3": "COUNT"}
    )
    table.header.update({"EXPOSURE": exposure_s, "BACKSCAL": backscal, "AREASCAL": 1.0, "POISSERR": True})
    table.header.update({"DETCHANS": len(counts), "CHANTYPE": "PI", "TLMIN1": 0, "TLMAX1": len(counts) - 1})
    table.header.update(links)
    path.write_bytes(_gzipped(fits.HDUList([fits.PrimaryHDU(), table])))


def expected_channel_counts(
    photon_density, area_cm2: np.ndarray, exposure_s: float, rmf_path: Path
) -> np.ndarray:
    from xmm_pipeline.ogip.read import read_rmf

    rmf = read_rmf(rmf_path)
    edges = energy_edges_kev()
    mid = 0.5 * (edges[:-1] + edges[1:])
    photons = photon_density(mid) * np.diff(edges) * area_cm2 * exposure_s
    return np.asarray(rmf.to_csr().T @ photons).ravel()


def product_name(obs_id: str, kind: str, src_num: int) -> str:
    return f"P{obs_id}PNS003{kind}0{src_num:03X}.FTZ"


def write_archive(root: Path, sources: list[dict], seed: int = 1) -> pd.DataFrame:
    """Write catalogue + products for `sources` (dicts: obs_id, src_num, detid, srcid, norm, and
    optionally pn_filter, exposure_s, index, sum_flag, ep_extent, pn_8_cts); returns the catalogue."""
    rng = np.random.default_rng(seed)
    rmf_path = root / "responses" / "PN" / RMF_FILE
    write_rmf(rmf_path)
    mid = 0.5 * (energy_edges_kev()[:-1] + energy_edges_kev()[1:])
    rows = []
    for source in sources:
        obs_id, src_num = source["obs_id"], source["src_num"]
        pn_filter = source.get("pn_filter", "Thin1")
        exposure = float(source.get("exposure_s", 20000.0))
        area = pn_like_area_cm2(mid, pn_filter, source.get("off_axis_arcmin", 0.0))
        index, norm = source.get("index", 1.9), source["norm"]
        expected = expected_channel_counts(lambda e, i=index, n=norm: n * e**-i, area, exposure, rmf_path)
        background_rate = np.full(N_CHANNELS, 2e-7) * exposure
        pps = root / obs_id / "pps"
        pps.mkdir(parents=True, exist_ok=True)
        links = {
            "BACKFILE": product_name(obs_id, "BGSPEC", src_num),
            "ANCRFILE": product_name(obs_id, "SRCARF", src_num),
            "RESPFILE": RMF_NAME,
        }
        source_counts = rng.poisson(expected + background_rate)
        write_pha(pps / product_name(obs_id, "SRSPEC", src_num), source_counts, exposure, 1.0e6, links)
        write_pha(
            pps / product_name(obs_id, "BGSPEC", src_num),
            rng.poisson(background_rate * 5),
            exposure,
            5.0e6,
            {},
        )
        write_arf(pps / product_name(obs_id, "SRCARF", src_num), area)
        row = {name: 0 for name in CANONICAL_COLUMNS}
        row |= {
            "detid": source["detid"],
            "srcid": source["srcid"],
            "iauname": f"4XMM J{source['srcid']:06d}",
            "obs_id": obs_id,
            "src_num": src_num,
            "ra": 10.0,
            "dec": -20.0,
            "sc_ra": 10.0,
            "sc_dec": -20.0,
            "mjd_start": 55000.0,
            "mjd_stop": 55000.5,
            "pn_filter": pn_filter,
            "pn_submode": "PrimeFullWindow",
            "pn_ontime": exposure,
            "pn_8_cts": source.get("pn_8_cts", float(source_counts.sum())),
            "ep_extent": source.get("ep_extent", 0.0),
            "sum_flag": source.get("sum_flag", 0),
            "n_detections": 1,
            "release": "TEST",
        }
        rows.append(row)
    catalogue = as_canonical(pd.DataFrame(rows))
    catalogue.to_parquet(root / "catalogue.parquet", index=False)
    return catalogue
