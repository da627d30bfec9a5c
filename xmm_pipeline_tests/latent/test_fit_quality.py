"""`similar --spectrum` says how well the model represents the user's spectrum, and refuses what it
cannot preprocess honestly (an RMF without area and no ARF, a spectrum not in a pn imaging mode)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from xmm_pipeline.cli import main
from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.build import LatentLayout
from xmm_pipeline.latent.fit_quality import BEYOND_SHARE, fit_quality

FIT_LINE = re.compile(r"fit: deviance/dof (\S+); (\S+)% of the (\d+) spectra in the latent map fit worse")


def test_fit_quality_places_a_spectrum_among_the_reference() -> None:
    reference = np.r_[np.arange(1.0, 101.0), np.nan]
    middle = fit_quality(50.5, reference)
    assert (middle.share_worse, middle.n_reference, middle.reference_max) == (0.5, 100, 100.0)
    assert not middle.beyond_training and middle.warning() is None
    assert "deviance/dof 50.5; 50.0% of the 100 spectra" in middle.line()
    edge = fit_quality(98.5, reference)
    assert edge.share_worse == 0.02 and not edge.beyond_training
    boundary = fit_quality(99.5, reference)
    assert boundary.share_worse == pytest.approx(0.01) and not boundary.beyond_training
    worst = fit_quality(250.0, reference)
    assert worst.share_worse == 0.0 and worst.beyond_training
    assert "beyond what the training set holds" in worst.warning()
    assert fit_quality(float("nan"), reference).beyond_training
    with pytest.raises(UserError, match="no finite deviance_per_dof"):
        fit_quality(1.0, np.array([np.nan]))


def test_beyond_means_fewer_than_the_share_fit_worse() -> None:
    reference = np.arange(1000.0)
    assert not fit_quality(reference[-int(1000 * BEYOND_SHARE) - 1], reference).beyond_training
    assert fit_quality(reference[-int(1000 * BEYOND_SHARE)] + 0.5, reference).beyond_training


@pytest.fixture(scope="module")
def latent_dir(spectra_dir: Path, trained_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("latent_fit")
    argv = ["embed", "--spectra", str(spectra_dir), "--model", str(trained_artifact), "--out", str(out)]
    assert main(argv) == 0
    return out


def _fit(err: str) -> tuple[float, float, int]:
    match = FIT_LINE.search(err)
    assert match, err
    return float(match[1]), float(match[2]) / 100, int(match[3])


def _product(archive: Path, obs_id: str, src_num: int, kind: str) -> Path:
    return next((archive / obs_id / "pps").glob(f"P{obs_id}PN*{kind}0{src_num:03X}.FTZ"))


def test_a_training_spectrum_fits_like_the_training_set(
    latent_dir: Path, sim_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    embeddings = LatentLayout(latent_dir).read_embeddings()
    target = embeddings.sort_values("deviance_per_dof").iloc[len(embeddings) // 2]
    spectrum = _product(sim_archive, target["obs_id"], int(target["src_num"]), "SRSPEC")
    respfile = fits.getheader(spectrum, "SPECTRUM")["RESPFILE"]
    rmf = next((sim_archive / "responses" / "PN").glob(Path(respfile).stem + "*"))
    capsys.readouterr()
    assert main(["similar", "--spectrum", str(spectrum), "--rmf", str(rmf), "-k", "3", "--latent",
                 str(latent_dir), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("query,rank")  # the machine-readable output stays clean
    deviance, share, n = _fit(captured.err)
    assert deviance == pytest.approx(target["deviance_per_dof"], rel=1e-3)
    reference = embeddings["deviance_per_dof"].to_numpy()
    assert n == len(embeddings)
    # the spectrum itself may land on either side of its own table entry: one spectrum's worth of slack
    assert share == pytest.approx(np.mean(reference > target["deviance_per_dof"]), abs=1 / n + 1e-3)
    assert 0.3 < share < 0.7 and "warning" not in captured.err


def test_the_circinus_ulx_is_beyond_what_the_model_represents(
    latent_dir: Path, real_pn_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = real_pn_dir / "circinus_ulx"
    capsys.readouterr()
    names = {"spectrum": "pn_spec.fits", "background": "pn_backspec.fits", "arf": "pn.arf", "rmf": "pn.rmf"}
    files = [f"--{option}={folder / name}" for option, name in names.items()]
    assert main(["similar", *files, "-k", "3", "--latent", str(latent_dir)]) == 0
    captured = capsys.readouterr()
    deviance, share, _ = _fit(captured.err)
    reference = LatentLayout(latent_dir).read_embeddings()["deviance_per_dof"].to_numpy()
    assert share == pytest.approx(np.mean(reference > deviance), abs=1.5e-3)
    assert share < BEYOND_SHARE
    assert "warning: deviance/dof" in captured.err and "beyond what the training set holds" in captured.err
    assert "rank" in captured.out  # the neighbours are still listed, under the warning


def _copy_with(source: Path, out: Path, extname: str | None = None, **header: str) -> Path:
    with fits.open(source) as hdus:
        hdus[0].header.update(header)
        if extname is not None:
            hdus[1].header.update({"EXTNAME": extname, **header})
        elif "SPECTRUM" in hdus:
            hdus["SPECTRUM"].header.update({k: v for k, v in header.items() if k in hdus["SPECTRUM"].header})
        hdus.writeto(out)
    return out


@pytest.mark.parametrize(
    ("alter", "message"),
    [
        ("rmf", "holds no effective area"),
        ("timing", "DATAMODE = TIMING: only pn IMAGING"),
        ("mos", "INSTRUME = EMOS2: not an EPIC-pn spectrum"),
    ],
)
def test_what_cannot_be_preprocessed_is_one_line_and_exit_2(
    latent_dir: Path, real_pn_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], alter: str,
    message: str,
) -> None:
    """A DETECTOR SPECRESP MATRIX given without ARF (on main: taken as the area, flux off by 10^3), a
    timing-mode and a MOS spectrum: refused, nothing printed on stdout."""
    folder = real_pn_dir / "circinus_ulx"
    spectrum, rmf = folder / "pn_spec.fits", folder / "pn.rmf"
    files = ["--background", str(folder / "pn_backspec.fits")]
    if alter == "rmf":
        rmf = _copy_with(rmf, tmp_path / "detector.rmf", extname="SPECRESP MATRIX", HDUCLAS3="DETECTOR")
    else:
        files += ["--arf", str(folder / "pn.arf")]
        timing = {"DATAMODE": "TIMING", "SUBMODE": "FastTiming"}
        header = timing if alter == "timing" else {"INSTRUME": "EMOS2"}
        spectrum = _copy_with(spectrum, tmp_path / "altered.fits", **header)
    capsys.readouterr()
    assert main(["similar", "--spectrum", str(spectrum), *files, "--rmf", str(rmf), "--latent",
                 str(latent_dir)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.out == ""
    if alter == "rmf":
        assert "--arf" in captured.err
