"""Pipeline product names, and the canned-RMF names they lead to."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmm_pipeline.archive.products import (
    PN_SPECTRAL_PRODUCT,
    canned_rmf_file_name,
    product_file_name,
    spectral_product_paths,
)
from xmm_pipeline.spectra.preprocess import find_rmf


def test_product_names_follow_the_pps_convention() -> None:
    assert product_file_name("0123456789", "SRSPEC", 23) == "P0123456789PNS003SRSPEC0017.FTZ"
    assert product_file_name("0123456789", "SRCARF", 0xABC) == "P0123456789PNS003SRCARF0ABC.FTZ"
    parsed = PN_SPECTRAL_PRODUCT.match(product_file_name("0123456789", "BGSPEC", 23))
    assert parsed is not None
    assert (parsed["obs_id"], parsed["kind"], int(parsed["src_hex"], 16)) == ("0123456789", "BGSPEC", 23)
    paths = spectral_product_paths(Path("/archive"), "0123456789", 1)
    assert paths["SRSPEC"] == Path("/archive/0123456789/pps/P0123456789PNS003SRSPEC0001.FTZ")


@pytest.mark.parametrize(
    "obs_id,src_num", [("123", 1), ("012345678a", 1), ("0123456789", 0), ("0123456789", 4096)]
)
def test_bad_names_are_refused(obs_id: str, src_num: int) -> None:
    with pytest.raises(ValueError):
        product_file_name(obs_id, "SRSPEC", src_num)


@pytest.mark.parametrize(
    "name", ["spectrum.fits", "P0123456789M1S003SRSPEC0017.FTZ", "P0123456789PNS003EXPMAP0017.FTZ"]
)
def test_not_a_pn_spectral_product(name: str) -> None:
    assert PN_SPECTRAL_PRODUCT.match(name) is None


def test_canned_rmf_names_and_lookup(tmp_path: Path) -> None:
    """The calibration site's name for a RESPFILE, and the lookup ingestion uses to find it."""
    spectrum_dir, responses = tmp_path / "pps", tmp_path / "responses"
    spectrum_dir.mkdir()
    responses.mkdir()
    assert canned_rmf_file_name("epn_e3_ff20_sdY9.rmf") == "epn_e3_ff20_sdY9_v21.0.rmf"
    assert find_rmf("epn_e3_ff20_sdY9.rmf", spectrum_dir, responses) is None
    served = responses / "epn_e3_ff20_sdY9_v19.0.rmf"
    served.write_bytes(b"")
    assert find_rmf("epn_e3_ff20_sdY9.rmf", spectrum_dir, responses) == served
    exact = responses / "epn_e3_ff20_sdY9.rmf"
    exact.write_bytes(b"")
    assert find_rmf("epn_e3_ff20_sdY9.rmf", spectrum_dir, responses) == exact
