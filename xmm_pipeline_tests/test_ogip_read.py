"""OGIP readers on the three real pn sets and on broken copies of written files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from xmm_pipeline.errors import ProductError
from xmm_pipeline.ogip import read as read_module
from xmm_pipeline.ogip.read import _read_table_astropy, read_arf, read_pha, read_rmf, read_table

REAL_SETS = {
    "ngc7793_p13": ("PN.pha", "PNbackground_spectrum.fits", "PN.arf", "PN.rmf", 11526),
    "igr_j18490": ("PN_PWN.fits", "PN_PWN_bkg.fits", "PN_PWN.arf", "PN_PWN.rmf", 3316),
    "circinus_ulx": ("pn_spec.fits", "pn_backspec.fits", "pn.arf", "pn.rmf", 48907),
}


@pytest.fixture(scope="module")
def real_rmfs(real_pn_dir: Path) -> dict:
    return {name: read_rmf(real_pn_dir / name / files[3]) for name, files in REAL_SETS.items()}


@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_real_spectra_match_astropy(real_pn_dir: Path, name: str) -> None:
    spectrum_file, background_file, _, _, total = REAL_SETS[name]
    for filename in (spectrum_file, background_file):
        path = real_pn_dir / name / filename
        pha = read_pha(path)
        with fits.open(path) as hdus:
            expected = hdus["SPECTRUM"].data
            header = hdus["SPECTRUM"].header
            np.testing.assert_array_equal(pha.counts, expected["COUNTS"])
            np.testing.assert_array_equal(pha.channel, expected["CHANNEL"])
            assert pha.exposure_s == pytest.approx(header["EXPOSURE"])
            assert pha.backscal == pytest.approx(header["BACKSCAL"])
        assert len(pha.counts) == pha.n_channels == 4096
        assert pha.poisson
    assert read_pha(real_pn_dir / name / spectrum_file).counts.sum() == total


def test_header_links(real_pn_dir: Path) -> None:
    p13 = read_pha(real_pn_dir / "ngc7793_p13" / "PN.pha")
    assert (p13.backfile, p13.respfile, p13.ancrfile) == ("PNbackground_spectrum.fits", "PN.rmf", "PN.arf")
    assert p13.keywords["FILTER"] == "Medium"
    assert set(np.unique(p13.quality)) == {0, 1}
    circinus = read_pha(real_pn_dir / "circinus_ulx" / "pn_spec.fits")
    assert (circinus.backfile, circinus.respfile, circinus.ancrfile) == (None, None, None)  # NONE
    igr = read_pha(real_pn_dir / "igr_j18490" / "PN_PWN.fits")
    assert igr.respfile is None and igr.backfile is None


@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_real_arfs(real_pn_dir: Path, name: str) -> None:
    arf = read_arf(real_pn_dir / name / REAL_SETS[name][2])
    assert len(arf.area_cm2) == 2067
    assert np.all(arf.energy_hi_kev > arf.energy_lo_kev)
    assert 500 < arf.area_cm2.max() < 1500


@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_real_rmfs(real_pn_dir: Path, real_rmfs: dict, name: str) -> None:
    rmf = real_rmfs[name]
    assert (rmf.n_energies, rmf.n_channels) == (2067, 4096)
    assert not rmf.includes_area
    dense = rmf.to_dense()
    row_sums = dense.sum(axis=1)
    assert np.all((row_sums > 0.9) & (row_sums < 1.0 + 1e-4))  # LO_THRES cut
    with fits.open(real_pn_dir / name / REAL_SETS[name][3]) as hdus:
        rows = hdus["MATRIX"].data
        for i in (0, 700, 1500, 2066):
            expected = np.zeros(4096)
            offset = 0
            for g in range(rows["N_GRP"][i]):
                first, n = rows["F_CHAN"][i][g], rows["N_CHAN"][i][g]
                expected[first : first + n] = rows["MATRIX"][i][offset : offset + n]
                offset += n
            np.testing.assert_allclose(dense[i], expected, rtol=1e-6)
    csr = rmf.to_csr()
    np.testing.assert_allclose(csr.toarray(), dense)


def test_fast_reader_agrees_with_astropy_on_gzip(real_pn_dir: Path, tmp_path: Path) -> None:
    source = real_pn_dir / "ngc7793_p13" / "PN.pha"
    gz = tmp_path / "PN.pha.gz"
    gz.write_bytes(gzip.compress(source.read_bytes()))
    fast = read_pha(gz)
    _, columns, _ = _read_table_astropy(source, ("SPECTRUM",), "SPECTRUM")
    np.testing.assert_array_equal(fast.counts, columns["COUNTS"])
    np.testing.assert_array_equal(fast.quality, columns["QUALITY"])
    assert fast.keywords["OBS_ID"] == "0693760101"


def _spectrum(path: Path, counts: np.ndarray, form: str = "J", **header) -> Path:
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column("CHANNEL", "I", array=np.arange(len(counts))),
            fits.Column("COUNTS", form, array=counts),
        ],
        name="SPECTRUM",
    )
    table.header.update(
        {"EXPOSURE": 1000.0, "BACKSCAL": 1.0, "POISSERR": True, "DETCHANS": len(counts)} | header
    )
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    return path


def test_rate_spectrum_and_column_backscal(tmp_path: Path) -> None:
    rate = np.full(16, 0.01)
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column("CHANNEL", "J", array=np.arange(1, 17)),
            fits.Column("RATE", "E", array=rate),
            fits.Column("BACKSCAL", "E", array=np.full(16, 2.0)),
        ],
        name="SPECTRUM",
    )
    table.header.update({"EXPOSURE": 500.0, "POISSERR": False, "HDUCLAS3": "RATE"})
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(tmp_path / "rate.pha")
    pha = read_pha(tmp_path / "rate.pha")
    np.testing.assert_allclose(pha.counts, 5.0)
    np.testing.assert_allclose(pha.backscal, 2.0)
    assert pha.channel[0] == 1


@pytest.mark.parametrize(
    ("counts", "form", "header", "problem"),
    [
        (np.arange(8), "J", {"EXPOSURE": 0.0}, "EXPOSURE"),
        (np.arange(8), "J", {"EXPOSURE": -5.0}, "EXPOSURE"),
        (np.r_[1.0, np.nan, 2, 3], "E", {}, "NaN"),
        (np.r_[1, -1, 2, 3], "J", {}, "negative COUNTS"),
        (np.r_[1.5, 1, 2, 3], "E", {}, "non-integer COUNTS"),
    ],
)
def test_bad_spectra_name_file_and_problem(tmp_path: Path, counts, form, header, problem) -> None:
    path = _spectrum(tmp_path / "bad.pha", counts, form, **header)
    with pytest.raises(ProductError, match=problem) as error:
        read_pha(path)
    assert error.value.path == str(path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ProductError, match="not found"):
        read_pha(tmp_path / "absent.pha")
    corrupt = tmp_path / "corrupt.FTZ"
    corrupt.write_bytes(gzip.compress(b"SIMPLE  = T" + b" " * 100)[:-10])
    with pytest.raises(ProductError, match=r"corrupt\.FTZ"):
        read_pha(corrupt)
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"not a fits file at all" * 200)
    with pytest.raises(ProductError, match=r"garbage\.fits"):
        read_pha(garbage)
    with pytest.raises(ProductError, match=r"absent\.rmf"):
        read_rmf(tmp_path / "absent.rmf")


def test_type_two_spectrum_is_refused(tmp_path: Path) -> None:
    table = fits.BinTableHDU.from_columns(
        [fits.Column("COUNTS", "8J", array=np.ones((3, 8), dtype=np.int32))]
    )
    table.header.update({"EXTNAME": "SPECTRUM", "EXPOSURE": 10.0})
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(tmp_path / "type2.pha")
    with pytest.raises(ProductError, match="type II"):
        read_pha(tmp_path / "type2.pha")


def test_rmf_tlmin_one_and_fixed_width_matrix(tmp_path: Path) -> None:
    """F_CHAN counted from 1 (TLMIN4 = 1), fixed-width MATRIX column, one row with no group."""
    lo, hi = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0])
    matrix = fits.BinTableHDU.from_columns(
        [
            fits.Column("ENERG_LO", "E", array=lo),
            fits.Column("ENERG_HI", "E", array=hi),
            fits.Column("N_GRP", "I", array=[1, 2, 0]),
            fits.Column("F_CHAN", "2I", array=[[1, 0], [2, 5], [0, 0]]),
            fits.Column("N_CHAN", "2I", array=[[2, 0], [1, 2], [0, 0]]),
            fits.Column("MATRIX", "3E", array=[[0.5, 0.5, 0], [0.2, 0.3, 0.5], [0, 0, 0]]),
        ],
        name="MATRIX",
    )
    matrix.header["TLMIN4"] = 1
    matrix.header["DETCHANS"] = 6
    ebounds = fits.BinTableHDU.from_columns(
        [
            fits.Column("CHANNEL", "I", array=np.arange(1, 7)),
            fits.Column("E_MIN", "E", array=np.arange(6) * 0.7),
            fits.Column("E_MAX", "E", array=np.arange(1, 7) * 0.7),
        ],
        name="EBOUNDS",
    )
    fits.HDUList([fits.PrimaryHDU(), matrix, ebounds]).writeto(tmp_path / "tiny.rmf")
    dense = read_rmf(tmp_path / "tiny.rmf").to_dense()
    expected = np.array([[0.5, 0.5, 0, 0, 0, 0], [0, 0.2, 0, 0, 0.3, 0.5], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(dense, expected, rtol=1e-6)


def test_fast_header_parser_joins_continue_cards(real_pn_dir: Path) -> None:
    header, _, _ = read_table(real_pn_dir / "igr_j18490" / "PN_PWN.fits", ("SPECTRUM",))
    assert header["SLCTEXPR"] == "(FLAG==0) && (PATTERN<=4) && ((X,Y) IN annulus(24142.959,22751,600,3000))"
    assert header["EXPOSURE"] == pytest.approx(8775.41028656111)


def test_fast_rmf_path_equals_astropy(real_pn_dir: Path, real_rmfs: dict, monkeypatch) -> None:
    def unsupported(path):
        raise read_module._UnsupportedError("forced")
        yield

    monkeypatch.setattr(read_module, "_fast_tables", unsupported)
    slow = read_rmf(real_pn_dir / "ngc7793_p13" / "PN.rmf")
    fast = real_rmfs["ngc7793_p13"]
    for name in (
        "group_energy_index",
        "group_first_channel",
        "group_n_chan",
        "values",
        "channel",
        "energy_lo_kev",
    ):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))



def test_fast_reader_needs_no_astropy_fallback_on_real_files(
    real_pn_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other real-file tests would pass through the astropy fallback too: here the fast reader
    alone must read every real file, and give the astropy path's arrays."""
    reference = {}
    with monkeypatch.context() as forced:
        forced.setattr(read_module, "_read_table_fast", read_module._read_table_astropy)
        forced.setattr(read_module, "_rmf_tables", read_module._rmf_tables_astropy)
        for name, (spectrum, _, arf, rmf, _) in REAL_SETS.items():
            folder = real_pn_dir / name
            reference[name] = (read_pha(folder / spectrum), read_arf(folder / arf), read_rmf(folder / rmf))

    def forbidden(*args: object) -> None:
        raise AssertionError(f"astropy fallback used for {args[0]}")

    monkeypatch.setattr(read_module, "_read_table_astropy", forbidden)
    monkeypatch.setattr(read_module, "_rmf_tables_astropy", forbidden)
    for name, (spectrum, background, arf, rmf, _) in REAL_SETS.items():
        folder = real_pn_dir / name
        pha, arf_ref, rmf_ref = reference[name]
        np.testing.assert_array_equal(read_pha(folder / spectrum).counts, pha.counts)
        read_pha(folder / background)
        np.testing.assert_array_equal(read_arf(folder / arf).area_cm2, arf_ref.area_cm2)
        np.testing.assert_array_equal(read_rmf(folder / rmf).to_dense(), rmf_ref.to_dense())


# ---------------------------------------------------------------- area in the matrix, instrument and mode

CANNED_RMF = ("canned", "epn_e3_ff20_sdY9_v19.0.rmf")
CANNED_ARF = ("canned", "pn_thin_onaxis.arf")


def _altered_rmf(real_pn_dir: Path, out: Path, extname: str, hduclas3: str | None, area=None) -> Path:
    """A tmp copy of the real canned RMF with its matrix extension renamed and HDUCLAS3 changed (None:
    removed); `area` (cm^2 per energy row) multiplies the rows, as in a FULL SPECRESP MATRIX."""
    with fits.open(real_pn_dir.joinpath(*CANNED_RMF)) as hdus:
        matrix = hdus["MATRIX"]
        if area is not None:
            for row, factor in zip(matrix.data["MATRIX"], area):
                row *= factor
        matrix.header["EXTNAME"] = extname
        if hduclas3 is None:
            del matrix.header["HDUCLAS3"]
        else:
            matrix.header["HDUCLAS3"] = hduclas3
        hdus.writeto(out)
    return out


def test_a_detector_specresp_matrix_holds_no_area(real_pn_dir: Path, tmp_path: Path) -> None:
    """HDUCLAS3 = DETECTOR under the name SPECRESP MATRIX: rows sum to 1, so no area; the ARF is needed."""
    from xmm_pipeline.spectra.response import compress_response

    detector = read_rmf(_altered_rmf(real_pn_dir, tmp_path / "det.rmf", "SPECRESP MATRIX", "DETECTOR"))
    assert not detector.includes_area
    with pytest.raises(ProductError, match="ARF is needed"):
        compress_response(detector, None)
    arf = read_arf(real_pn_dir.joinpath(*CANNED_ARF))
    area, matrix = compress_response(detector, arf)
    reference_area, reference_matrix = compress_response(read_rmf(real_pn_dir.joinpath(*CANNED_RMF)), arf)
    np.testing.assert_allclose(area, reference_area)
    np.testing.assert_allclose(matrix, reference_matrix)
    unnamed = read_rmf(_altered_rmf(real_pn_dir, tmp_path / "none.rmf", "SPECRESP MATRIX", None))
    assert not unnamed.includes_area  # no HDUCLAS3: the row sums (1) decide


def test_a_full_matrix_holds_the_area_and_a_contradiction_is_refused(
    real_pn_dir: Path, tmp_path: Path
) -> None:
    from xmm_pipeline.spectra.response import compress_response

    arf = read_arf(real_pn_dir.joinpath(*CANNED_ARF))
    reference_area, _ = compress_response(read_rmf(real_pn_dir.joinpath(*CANNED_RMF)), arf)
    for hduclas3 in ("FULL", None):
        path = _altered_rmf(real_pn_dir, tmp_path / f"full_{hduclas3}.rmf", "SPECRESP MATRIX", hduclas3,
                            area=arf.area_cm2)
        full = read_rmf(path)
        assert full.includes_area
        area, _ = compress_response(full, None)
        np.testing.assert_allclose(area, reference_area, rtol=1e-5)
    lying = _altered_rmf(real_pn_dir, tmp_path / "lying.rmf", "MATRIX", "FULL")
    with pytest.raises(ProductError, match=r"HDUCLAS3 = FULL .* largest row sum is 1") as error:
        read_rmf(lying)
    assert error.value.path == str(lying)
    redist_with_area = _altered_rmf(real_pn_dir, tmp_path / "area.rmf", "MATRIX", "REDIST", area=arf.area_cm2)
    with pytest.raises(ProductError, match="HDUCLAS3 = REDIST says the matrix holds no effective area"):
        read_rmf(redist_with_area)


def _altered_spectrum(source: Path, out: Path, **primary) -> Path:
    with fits.open(source) as hdus:
        for key, value in primary.items():
            if value is None:
                del hdus[0].header[key]
                if key in hdus["SPECTRUM"].header:
                    del hdus["SPECTRUM"].header[key]
            else:
                hdus[0].header[key] = value
                if key in hdus["SPECTRUM"].header:
                    hdus["SPECTRUM"].header[key] = value
        hdus.writeto(out)
    return out


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"INSTRUME": "EMOS1"}, "INSTRUME = EMOS1: not an EPIC-pn spectrum"),
        ({"INSTRUME": "RGS1"}, "INSTRUME = RGS1: not an EPIC-pn spectrum"),
        ({"DATAMODE": "TIMING", "SUBMODE": "FastTiming"}, "DATAMODE = TIMING: only pn IMAGING"),
        ({"DATAMODE": "BURST", "SUBMODE": "FastBurst"}, "DATAMODE = BURST"),
        ({"SUBMODE": "FastTiming"}, "SUBMODE = FastTiming: not a pn imaging mode"),
        ({"DATAMODE": None, "SUBMODE": "FastBurst"}, "SUBMODE = FastBurst"),
    ],
)
def test_only_pn_imaging_spectra_pass(real_pn_dir: Path, tmp_path: Path, header: dict, reason: str) -> None:
    from xmm_pipeline.ogip.read import check_pn_imaging

    source = real_pn_dir / "igr_j18490" / "PN_PWN.fits"
    check_pn_imaging(read_pha(source))
    altered = _altered_spectrum(source, tmp_path / "altered.fits", **header)
    with pytest.raises(ProductError, match=reason) as error:
        check_pn_imaging(read_pha(altered))
    assert error.value.path == str(altered)


def test_every_real_spectrum_is_pn_imaging(real_pn_dir: Path) -> None:
    from xmm_pipeline.ogip.read import PN_IMAGING_SUBMODES, check_pn_imaging

    for name, (spectrum, background, *_) in REAL_SETS.items():
        for path in (real_pn_dir / name / spectrum, real_pn_dir / name / background):
            pha = read_pha(path)
            check_pn_imaging(pha)
            assert pha.keywords["DATAMODE"] == "IMAGING" and pha.keywords["SUBMODE"] in PN_IMAGING_SUBMODES


@pytest.mark.parametrize(
    "header",
    [{"SUBMODE": "PrimeFullWindowExtended"}, {"SUBMODE": "PrimeLargeWindow"}, {"SUBMODE": "PrimeSmallWindow"},
     {"SUBMODE": None, "DATAMODE": None, "INSTRUME": None}],
)
def test_other_imaging_modes_and_silent_headers_pass(real_pn_dir: Path, tmp_path: Path, header: dict) -> None:
    from xmm_pipeline.ogip.read import check_pn_imaging

    source = real_pn_dir / "igr_j18490" / "PN_PWN.fits"
    check_pn_imaging(read_pha(_altered_spectrum(source, tmp_path / "mode.fits", **header)))
