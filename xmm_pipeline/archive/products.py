"""Pipeline product names and where they live on disk (the XSA's layout, shared by both archives).

`P<obs_id><inst><S|U|X><exp:3><type:6><field:1><src:3 hex>.FTZ`, e.g. P0123456789PNS003SRSPEC0017.FTZ
is the pn source spectrum of source 0x017 = 23 in scheduled exposure 003. Canned RMFs are named by a
spectrum's RESPFILE (`epn_e3_ff20_sdY9.rmf`) and served as `<stem><version>.rmf`, the version suffix
in the calibration site's PN/Version.txt (`_v22.0` in 2026; v18-v21 identical, the simulator's v21.0).
"""

from __future__ import annotations

import re
from pathlib import Path

from xmm_pipeline.archive.base import RESPONSES_SUBDIR

SPECTRAL_PRODUCTS = ("SRSPEC", "BGSPEC", "SRCARF")
DEFAULT_EXPOSURE = "S003"
CANNED_RMF_VERSIONS = ("v21.0", "v20.0", "v19.0", "v18.0")
# the pn spectral products among them, e.g. P0123456789PNS003SRSPEC0017.FTZ
PN_SPECTRAL_PRODUCT = re.compile(
    r"^P(?P<obs_id>\d{10})PN(?P<expflag>[SUX])(?P<expno>\d{3})(?P<kind>SRSPEC|BGSPEC|SRCARF)"
    r"(?P<field>[0-9A-Z])(?P<src_hex>[0-9A-F]{3})\.FTZ$"
)


def product_file_name(
    obs_id: str, kind: str, src_num: int, instrument: str = "PN", exposure: str = DEFAULT_EXPOSURE
) -> str:
    """`P<obs_id>PNS003<kind>0<HHH>.FTZ` with HHH = format(src_num, '03X')."""
    if not (len(obs_id) == 10 and obs_id.isdigit()):
        raise ValueError(f"obs_id must have 10 digits, got {obs_id!r}")
    if not 0 < src_num < 0x1000:
        raise ValueError(f"source number must be within 1..4095, got {src_num}")
    return f"P{obs_id}{instrument}{exposure}{kind}0{src_num:03X}.FTZ"


def observation_dir(root: str | Path, obs_id: str) -> Path:
    return Path(root) / obs_id / "pps"


def product_path(root: str | Path, obs_id: str, kind: str, src_num: int) -> Path:
    return observation_dir(root, obs_id) / product_file_name(obs_id, kind, src_num)


def spectral_product_paths(root: str | Path, obs_id: str, src_num: int) -> dict[str, Path]:
    """SRSPEC, BGSPEC, SRCARF paths of one detection."""
    return {kind: product_path(root, obs_id, kind, src_num) for kind in SPECTRAL_PRODUCTS}


def canned_rmf_file_name(respfile: str, version: str = CANNED_RMF_VERSIONS[0]) -> str:
    """'epn_e3_ff20_sdY9.rmf' -> 'epn_e3_ff20_sdY9_v21.0.rmf' (the calibration site's name)."""
    stem = Path(respfile.strip()).name
    stem = stem[:-4] if stem.lower().endswith(".rmf") else stem
    return f"{stem}_{version}.rmf"


def responses_dir(root: str | Path) -> Path:
    return Path(root) / RESPONSES_SUBDIR
