"""Cross-match: the SIMBAD path against a loopback TAP server, the otype mapping, the truth table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.crossmatch import (
    angular_separation_arcsec,
    classes_from_simbad,
    classes_from_truth,
    simbad_class,
    simbad_upload_query,
    source_classes,
)
from xmm_pipeline_tests.latent.tap_server import SimbadTapServer

ARCSEC_DEG = 1 / 3600


def _sky() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Detections and SIMBAD objects: one exact match per class, a nearer and a farther object for one
    detection, and one detection with nothing within the radius."""
    detections = pd.DataFrame({
        "detid": np.arange(1, 9, dtype=np.int64) + 100_000_000_000_000,
        "srcid": np.arange(1, 9, dtype=np.int64) + 200_000_000_000,
        "ra": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 359.9999, 80.0],
        "dec": [-30.0, 0.0, 45.0, 89.9, -89.9, 10.0, 20.0, 5.0],
    })
    objects = pd.DataFrame({
        "main_id": ["NGC 1", "HD 2", "V* CV 3", "4U 4", "NGC 5 ULX1", "RX J6", "Psr 7", "Gal", "Star"],
        "otype": ["Sy1", "BY*", "CV*", "LXB", "ULX", "N*", "Psr", "G", "PM*"],
        "ra": [10.0 + 1 * ARCSEC_DEG, 20.0, 30.0, 40.0, 50.0, 60.0 + 2 * ARCSEC_DEG, 0.0001, 10.0, 10.0],
        "dec": [-30.0, 0.0 - 0.5 * ARCSEC_DEG, 45.0, 89.9, -89.9, 10.0, 20.0, -30.0 + 4 * ARCSEC_DEG,
                -30.0 - 1.5 * ARCSEC_DEG],
    })
    return detections, objects


def test_simbad_crossmatch_over_loopback_tap() -> None:
    detections, objects = _sky()
    with SimbadTapServer(objects) as server:
        classes = classes_from_simbad(detections, tap_url=server.url, radius_arcsec=5.0, batch_rows=3)
    assert [r["upload_rows"] for r in server.requests] == [3, 3, 2]
    by_detid = classes.set_index("detid")
    assert list(classes["detid"]) == list(detections["detid"])
    got = by_detid["class"].tolist()
    # detection 1 has Sy1 at 1", PM* at 1.5", G at 4": the nearest wins
    assert got == ["AGN", "star", "CV", "XRB", "ULX", "NS", "NS", "unknown"]
    first = by_detid.iloc[0]
    assert first["simbad_main_id"] == "NGC 1" and first["separation_arcsec"] == pytest.approx(0.866, abs=0.01)
    assert by_detid.iloc[6]["separation_arcsec"] < 1  # across RA = 0
    assert np.isnan(by_detid.iloc[7]["separation_arcsec"]) and by_detid.iloc[7]["simbad_main_id"] == ""
    assert (classes["source"] == "simbad").all()
    assert (classes["srcid"] == detections["srcid"]).all()


def test_simbad_retries_transient_failures_and_reports_persistent_ones() -> None:
    detections, objects = _sky()
    with SimbadTapServer(objects, fail_first=1) as server:
        classes = classes_from_simbad(detections, tap_url=server.url, batch_rows=100, attempts=2)
    assert len(server.requests) == 2 and classes["class"].iloc[0] == "AGN"
    with SimbadTapServer(objects, fail_first=5) as server, pytest.raises(UserError, match="failed after 2"):
        classes_from_simbad(detections, tap_url=server.url, attempts=2)


def test_overflowing_batch_is_refused_not_truncated() -> None:
    detections, objects = _sky()
    crowded = pd.concat([objects.iloc[[0]]] * 30, ignore_index=True)
    with SimbadTapServer(crowded) as server, pytest.raises(UserError, match="truncated"):
        classes_from_simbad(detections.iloc[:1], tap_url=server.url, batch_rows=1, maxrec=10)
    assert len(server.requests) == 1


def test_rejected_query_is_not_retried() -> None:
    detections, objects = _sky()
    with SimbadTapServer(objects, known_tables=()) as server, pytest.raises(UserError, match="rejected"):
        classes_from_simbad(detections, tap_url=server.url, attempts=3)
    assert len(server.requests) == 1


@pytest.mark.parametrize("radius", [0.0, -1.0, float("nan"), float("inf"), 1e6, "1; DROP TABLE basic"])
def test_adql_only_from_validated_radius(radius: object) -> None:
    with pytest.raises((UserError, ValueError)):
        simbad_upload_query(radius)  # type: ignore[arg-type]
    assert "0.001388888888888889" in simbad_upload_query(5.0)
    with pytest.raises(UserError, match="identifier"):
        simbad_upload_query(5.0, upload_name="x; --")


def test_invalid_positions_are_named() -> None:
    detections, _ = _sky()
    detections.loc[2, "dec"] = 95.0
    with pytest.raises(UserError, match=f"detection {detections.loc[2, 'detid']}"):
        classes_from_simbad(detections, tap_url="http://127.0.0.1:9/never-called")


@pytest.mark.parametrize(("otype", "expected"), [
    ("QSO", "AGN"), ("Seyfert1", "AGN"), ("AGN_Candidate", "AGN"), ("BLL", "AGN"), ("HXB", "XRB"),
    ("HighMassXBin", "XRB"), ("XB?", "XRB"), ("CataclyV*", "CV"), ("No*", "CV"), ("UX?", "ULX"),
    ("Psr", "NS"), ("N*", "NS"), ("TDE", "TDE"), ("*", "star"), ("RS*", "star"), ("YSO", "star"),
    ("Low-Mass*_Candidate", "star"), ("G", "other"), ("X", "other"), ("", "unknown"), (None, "unknown"),
])
def test_simbad_types_map_onto_classes(otype: str | None, expected: str) -> None:
    assert simbad_class(otype) == expected


def test_separation_is_great_circle() -> None:
    assert angular_separation_arcsec(0.0, 89.0, 180.0, 89.0) == pytest.approx(7200.0, rel=1e-9)
    assert angular_separation_arcsec(359.999, 0.0, 0.001, 0.0) == pytest.approx(7.2, rel=1e-6)


def test_truth_table_is_the_offline_default(tmp_path) -> None:
    truth = pd.DataFrame({"detid": [1, 2, 3], "srcid": [10, 10, 30], "class": ["TDE", "TDE", "AGN"],
                          "is_odd": [False, False, True]})
    truth.to_parquet(tmp_path / "truth.parquet")
    assert classes_from_truth(tmp_path)["class"].tolist() == ["TDE", "TDE", "AGN"]
    embeddings = pd.DataFrame({"detid": [3, 1, 4], "srcid": [30, 10, 40]})
    classes = source_classes(embeddings, archive_dir=tmp_path)
    assert classes["class"].tolist() == ["AGN", "TDE", "unknown"]
    assert classes["is_odd"].iloc[0]
    assert source_classes(embeddings)["class"].eq("unknown").all()
    with pytest.raises(UserError, match="no truth table"):
        classes_from_truth(tmp_path / "nowhere")
