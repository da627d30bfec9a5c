"""OGIP writers: what astropy and any OGIP reader see, byte stability, and refusal of bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from xmm_pipeline.ogip.read import read_pha
from xmm_pipeline.ogip.write import write_arf, write_pha, write_rmf


def _pha(path: Path, counts: np.ndarray) -> Path:
    return write_pha(
        path,
        counts,
        exposure_s=20265.98,
        backscal=2010100.0,
        respfile="epn_e3_ff20_sdY9.rmf",
        ancrfile="arf.FTZ",
        backfile="bkg.FTZ",
        filter_name="Medium",
        header_extra={"OBS_ID": "0693760101"},
    )


def test_pha_reads_back_with_ogip_keywords(tmp_path: Path) -> None:
    counts = np.random.default_rng(1).poisson(2.0, 4096)
    path = _pha(tmp_path / "P0693760101PNS003SRSPEC0001.FTZ", counts)
    with fits.open(path) as hdus:
        hdus.verify("exception")
        spectrum = hdus["SPECTRUM"]
        header = spectrum.header
        assert header["HDUCLASS"] == "OGIP" and header["HDUCLAS1"] == "SPECTRUM"
        assert header["HDUCLAS2"] == "TOTAL" and header["HDUCLAS3"] == "COUNT"
        assert header["POISSERR"] is True and header["CHANTYPE"] == "PI" and header["DETCHANS"] == 4096
        assert header["TELESCOP"] == "XMM" and header["INSTRUME"] == "EPN" and header["FILTER"] == "Medium"
        assert header["EXPOSURE"] == pytest.approx(20265.98) and header["BACKSCAL"] == 2010100.0
        assert header["RESPFILE"] == "epn_e3_ff20_sdY9.rmf" and header["TLMIN1"] == 0
        assert header["OBS_ID"] == "0693760101"
        assert np.array_equal(spectrum.data["CHANNEL"], np.arange(4096))
        assert spectrum.data["COUNTS"].dtype.kind == "i"
        assert np.array_equal(spectrum.data["COUNTS"], counts)


def test_gzip_is_byte_stable_and_unchanged_files_are_not_rewritten(tmp_path: Path) -> None:
    counts = np.arange(4096) % 7
    first = _pha(tmp_path / "a.FTZ", counts).read_bytes()
    assert gzip.decompress(first)[:6] == b"SIMPLE"
    assert first[4:8] == b"\0\0\0\0"  # gzip MTIME field
    second_path = _pha(tmp_path / "b.FTZ", counts)
    assert second_path.read_bytes() == first
    stamp = second_path.stat().st_mtime_ns
    _pha(second_path, counts)
    assert second_path.stat().st_mtime_ns == stamp
    assert not _pha(tmp_path / "plain.pha", counts).read_bytes().startswith(b"\x1f\x8b")


@pytest.mark.parametrize("counts", [np.full(4096, 1.5), np.full(4096, -1), np.ones((2, 4096))])
def test_pha_refuses_non_poisson_counts(tmp_path: Path, counts: np.ndarray) -> None:
    with pytest.raises(ValueError, match="non-negative integers"):
        _pha(tmp_path / "bad.FTZ", counts)


def test_pha_quality_column_as_pipeline_source_spectra_carry_it(tmp_path: Path) -> None:
    """A QUALITY column (int16, TFORM I, as SAS writes it) that astropy and the project's reader see;
    without one the spectrum has no such column and the keyword says all channels are good."""
    counts = np.random.default_rng(3).poisson(2.0, 4096)
    quality = (np.arange(4096) <= 60).astype(np.int16)
    path = write_pha(
        tmp_path / "src.FTZ",
        counts,
        exposure_s=1000.0,
        backscal=1.0,
        respfile="epn_e3_ff20_sdY9.rmf",
        ancrfile="arf.FTZ",
        backfile="bkg.FTZ",
        quality=quality,
    )
    with fits.open(path) as hdus:
        hdus.verify("exception")
        spectrum = hdus["SPECTRUM"]
        assert spectrum.columns["QUALITY"].format == "I"
        assert np.array_equal(spectrum.data["QUALITY"], quality)
        assert np.array_equal(spectrum.data["COUNTS"], counts) and spectrum.header["QUALITY"] == 0
    assert np.array_equal(read_pha(path).quality, quality)
    plain = _pha(tmp_path / "bkg.FTZ", counts)
    with fits.open(plain) as hdus:
        assert "QUALITY" not in hdus["SPECTRUM"].columns.names and hdus["SPECTRUM"].header["QUALITY"] == 0
    for bad in (quality[:100], np.full(4096, 0.5)):
        with pytest.raises(ValueError, match="quality"):
            write_pha(
                tmp_path / "bad.FTZ",
                counts,
                exposure_s=1.0,
                backscal=1.0,
                respfile="r",
                ancrfile="a",
                backfile="b",
                quality=bad,
            )


def test_arf_and_rmf_round_trip(tmp_path: Path) -> None:
    edges = np.linspace(0.1, 10.0, 41)
    area = np.linspace(100.0, 900.0, 40)
    arf = write_arf(tmp_path / "x.arf", edges[:-1], edges[1:], area, filter_name="Thin1")
    with fits.open(arf) as hdus:
        hdus.verify("exception")
        table = hdus["SPECRESP"]
        assert table.header["HDUCLAS2"] == "SPECRESP"
        assert np.allclose(table.data["SPECRESP"], area)
        assert np.allclose(table.data["ENERG_LO"], edges[:-1])

    rng = np.random.default_rng(2)
    matrix = rng.random((40, 64)) * (rng.random((40, 64)) < 0.3)
    matrix[5] = 0.0
    rmf = write_rmf(
        tmp_path / "x.rmf",
        edges[:-1],
        edges[1:],
        matrix,
        np.arange(64) * 0.16,
        np.arange(1, 65) * 0.16,
        threshold=0.0,
    )
    with fits.open(rmf) as hdus:
        hdus.verify("exception")
        table = hdus["MATRIX"]
        assert table.header["HDUCLAS3"] == "REDIST" and table.header["TLMIN4"] == 0
        assert table.header["DETCHANS"] == 64
        assert "P" in table.columns["MATRIX"].format
        assert "P" in table.columns["F_CHAN"].format
        dense = np.zeros_like(matrix)
        for row, record in enumerate(table.data):
            position = 0
            for first, width in zip(record["F_CHAN"], record["N_CHAN"]):
                dense[row, first : first + width] = record["MATRIX"][position : position + width]
                position += width
            assert record["N_GRP"] == len(record["F_CHAN"])
        assert np.allclose(dense, matrix, atol=1e-7)
        assert np.allclose(hdus["EBOUNDS"].data["E_MIN"], np.arange(64) * 0.16)
