"""An output the user cannot write (`--out` of preprocess/train/embed, `--plot` of show/trajectory) is
one line on stderr and exit 2, found before any work. Tests run as root in CI, where permission bits
stop nothing: the unwritable paths here refuse root too (below a regular file, inside /proc, an
immutable folder when chattr works)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from xmm_pipeline.cli import main
from xmm_pipeline.cli.paths import writable_file, writable_folder
from xmm_pipeline.errors import UserError


@pytest.fixture
def immutable_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "immutable"
    folder.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and a supporting filesystem)")
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def unwritable_folders(tmp_path: Path) -> list[Path]:
    regular = tmp_path / "a_file"
    regular.write_text("not a folder")
    return [regular / "out", Path("/proc"), Path("/proc/xmm_pipeline_out")]


def _one_line_error(capsys: pytest.CaptureFixture[str], option: str, path: Path) -> str:
    """The command's stdout, after checking its stderr is one line naming the option and the path."""
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert option in captured.err and str(path) in captured.err and "cannot write" in captured.err
    return captured.out


def _refused(folder: Path) -> None:
    with pytest.raises(UserError, match=r"--out .*cannot write there"):
        writable_folder(folder, "--out")
    with pytest.raises(UserError, match=r"--plot .*cannot write there"):
        writable_file(folder / "plot.png", "--plot")


def test_probe_refuses_an_immutable_folder(immutable_folder: Path):
    _refused(immutable_folder)


def test_probe_refuses_what_really_refuses_writes(tmp_path: Path):
    for folder in unwritable_folders(tmp_path):
        _refused(folder)
    nested = tmp_path / "new" / "deeper"
    assert writable_folder(nested, "--out") == nested
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind
    existing = tmp_path / "plot.png"
    existing.write_bytes(b"old")
    writable_file(existing, "--plot")
    assert existing.read_bytes() == b"old"


def test_preprocess_refuses_an_unwritable_out_before_work(
    sim_archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    for out in unwritable_folders(tmp_path):
        assert main(["preprocess", "--archive", str(sim_archive), "--out", str(out)]) == 2
        _one_line_error(capsys, "--out", out)


def test_preprocess_refuses_an_immutable_out(
    sim_archive: Path, immutable_folder: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["preprocess", "--archive", str(sim_archive), "--out", str(immutable_folder)]) == 2
    _one_line_error(capsys, "--out", immutable_folder)


def test_train_refuses_an_unwritable_out_before_training(
    spectra_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    for out in unwritable_folders(tmp_path):
        assert main(["train", "--spectra", str(spectra_dir), "--out", str(out), "--epochs", "1",
                     "--device", "cpu"]) == 2
        assert "training" not in _one_line_error(capsys, "--out", out)


def test_embed_refuses_an_unwritable_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    for out in unwritable_folders(tmp_path):
        assert main(["embed", "--spectra", str(tmp_path), "--model", str(tmp_path), "--out", str(out)]) == 2
        _one_line_error(capsys, "--out", out)


@pytest.mark.parametrize("command", [["show", "1"], ["trajectory", "1"]])
def test_an_unwritable_plot_is_refused_before_reading_anything(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    regular = tmp_path / "a_file"
    regular.write_text("not a folder")
    for plot in (regular / "plot.png", Path("/proc/plot.png"), tmp_path):
        assert main([*command, "--plot", str(plot), "--latent", str(tmp_path / "no_latent")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--plot" in err and str(plot) in err, err
