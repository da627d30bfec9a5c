"""Pipeline product names and canned-RMF lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmm_pipeline.archive.products import (
    canned_rmf_file_name,
    find_canned_rmf,
    parse_product_name,
    product_file_name,
    spectral_product_paths,
)


def test_product_names_follow_the_pps_convention() -> None:
    assert product_file_name("0123456789", "SRSPEC", 23) == "P0123456789PNS003SRSPEC0017.FTZ"
    assert product_file_name("0123456789", "SRCARF", 0xABC) == "P0123456789PNS003SRCARF0ABC.FTZ"
    parsed = parse_product_name("P0123456789PNS003BGSPEC0017.FTZ")
    assert (parsed.obs_id, parsed.kind, parsed.src_num, parsed.instrument) == (
        "0123456789",
        "BGSPEC",
        23,
        "PN",
    )
    assert parsed.file_name == "P0123456789PNS003BGSPEC0017.FTZ"
    paths = spectral_product_paths(Path("/archive"), "0123456789", 1)
    assert paths["SRSPEC"] == Path("/archive/0123456789/pps/P0123456789PNS003SRSPEC0001.FTZ")


@pytest.mark.parametrize(
    "obs_id,src_num", [("123", 1), ("012345678a", 1), ("0123456789", 0), ("0123456789", 4096)]
)
def test_bad_names_are_refused(obs_id: str, src_num: int) -> None:
    with pytest.raises(ValueError):
        product_file_name(obs_id, "SRSPEC", src_num)


def test_not_a_product_name() -> None:
    with pytest.raises(ValueError, match="not a pipeline product"):
        parse_product_name("spectrum.fits")


def test_canned_rmf_lookup(tmp_path: Path) -> None:
    assert canned_rmf_file_name("epn_e3_ff20_sdY9.rmf") == "epn_e3_ff20_sdY9_v21.0.rmf"
    assert find_canned_rmf(tmp_path, "epn_e3_ff20_sdY9.rmf") is None
    served = tmp_path / "epn_e3_ff20_sdY9_v19.0.rmf"
    served.write_bytes(b"")
    assert find_canned_rmf(tmp_path, "epn_e3_ff20_sdY9.rmf") == served
    exact = tmp_path / "epn_e3_ff20_sdY9.rmf"
    exact.write_bytes(b"")
    assert find_canned_rmf(tmp_path, " epn_e3_ff20_sdY9.rmf ") == exact
