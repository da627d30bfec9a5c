"""Progress: the reporter on a terminal and in a log, and the long steps calling it as they go."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xmm_pipeline.cli import main
from xmm_pipeline.progress import Progress, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check(self, total: int) -> None:
        """At least one call; done never decreases, total fixed, the last call says finished."""
        assert self.calls, "progress was never called"
        done = [d for d, _ in self.calls]
        assert done == sorted(done) and {t for _, t in self.calls} == {total}
        assert self.calls[-1] == (total, total)


def test_log_lines_are_periodic_with_rate_and_time_left() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress("preprocess", "spectra", stream=stream, every_s=10.0, clock=clock)
    for done in range(1, 101):
        clock.now = done * 0.5  # 2 spectra/s: 50 s in all
        progress(done, 100)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "preprocess: 1/100 spectra (1%), 2.0 spectra/s, 0:50 left"
    assert lines[1] == "preprocess: 21/100 spectra (21%), 2.0 spectra/s, 0:40 left"
    assert lines[-1] == "preprocess: 100/100 spectra (100%) in 0:50, 2.0 spectra/s"
    assert len(lines) == 6  # 0.5, 10.5, 20.5, 30.5, 40.5 s and the end: not one line per spectrum
    progress(100, 100)
    assert len(stream.getvalue().splitlines()) == 6


def test_terminal_bar_redraws_one_line() -> None:
    clock, stream = FakeClock(), TTY()
    progress = Progress("simulate", "detections", stream=stream, clock=clock)
    assert progress.tty
    for done in range(0, 1001, 100):
        clock.now += 1.0
        progress(done, 1000)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = [f.removesuffix("\033[K\n").removesuffix("\033[K") for f in text.split("\r") if f]
    assert frames[0] == "simulate: [........................] 0/1000 detections (0%)"
    assert frames[4] == ("simulate: [##########..............] 400/1000 detections (40%), 80.0 detections/s, "
                         "0:08 left")
    assert frames[-1].startswith("simulate: [########################] 1000/1000 detections (100%) in 0:11")


def test_notes_print_above_the_bar() -> None:
    clock, bar, out = FakeClock(), TTY(), io.StringIO()
    progress = Progress("train", "epochs", stream=bar, clock=clock)
    clock.now = 1.0
    progress(1, 10)
    progress.note("      1       100.00", stream=out)
    assert out.getvalue() == "      1       100.00\n"
    assert bar.getvalue().count("\r") == 3  # drawn, cleared for the note, drawn again
    assert bar.getvalue().endswith("1/10 epochs (10%), 1.0 epochs/s, 0:09 left\033[K")
    progress.close()
    assert bar.getvalue().endswith("\n")


def test_durations_and_slow_rates_read_well() -> None:
    assert format_duration(59.6) == "1:00" and format_duration(3725) == "1:02:05"
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress("download", "observations", stream=stream, clock=clock)
    clock.now = 30.0
    progress(1, 3)
    assert stream.getvalue() == "download: 1/3 observations (33%), 30.0 s per observation, 1:00 left\n"


def test_simulate_and_preprocess_report_progress(tmp_path: Path) -> None:
    from xmm_pipeline.archive.simulated import simulate_archive
    from xmm_pipeline.spectra.preprocess import PreprocessConfig, preprocess_archive

    simulated = Recorder()
    summary = simulate_archive(tmp_path / "archive", "DR14", 60, 3, progress=simulated)
    simulated.check(summary.n_detections)
    preprocessed = Recorder()
    config = PreprocessConfig(min_counts=50)
    result = preprocess_archive(tmp_path / "archive", tmp_path / "spectra", config, progress=preprocessed)
    preprocessed.check(result.selected)
    assert len(preprocessed.calls) == result.observations


def test_download_reports_each_observation(tmp_path: Path) -> None:
    from xmm_pipeline.archive.xsa import XSAArchive
    from xmm_pipeline_tests.archive.servers import AioFaults, AioServer, write_test_archive

    catalogue = write_test_archive(tmp_path / "source", n_obs=3, sources_per_obs=2, seed=1)
    obs_ids = sorted(catalogue["obs_id"].unique())
    recorder = Recorder()
    with AioServer(tmp_path / "source", AioFaults()) as server:
        archive = XSAArchive(tmp_path / "copy", aio_url=server.aio_url, rmf_url=server.rmf_url, timeout_s=5)
        assert archive.fetch_observations(obs_ids, progress=recorder) == []
    assert recorder.calls == [(1, 3), (2, 3), (3, 3)]


def test_embedding_reports_each_part(monkeypatch: pytest.MonkeyPatch) -> None:
    from xmm_pipeline.latent import embed

    class Encoder:
        version = "fake"

        def encode(self, dataset):
            x = dataset.counts.sum(axis=1, keepdims=True).astype(np.float32)
            return np.hstack([x, -x]), np.zeros((len(x), 2), np.float32)

        def deviance_per_dof(self, dataset):
            return dataset.counts.mean(axis=1)

    from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset

    dataset = make_synthetic_dataset(50, seed=2)
    whole = embed.embed_dataset(Encoder(), dataset)
    monkeypatch.setattr(embed, "EMBED_CHUNK", 16)
    recorder = Recorder()
    parts = embed.embed_dataset(Encoder(), dataset, progress=recorder)
    assert recorder.calls == [(16, 50), (32, 50), (48, 50), (50, 50)]
    pd.testing.assert_frame_equal(parts, whole)


def test_train_prints_epochs_as_they_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from xmm_pipeline.model import train
    from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset, write_spectra_dir

    spectra = write_spectra_dir(make_synthetic_dataset(40, seed=3), tmp_path / "spectra")
    seen_during: list[str] = []
    errors: list[str] = []
    real_train = train.train_model

    def watching(*args, on_epoch_end=None, **kwargs):
        def wrapped(row):
            on_epoch_end(row)
            captured = capsys.readouterr()
            seen_during.append(captured.out)
            errors.append(captured.err)
        return real_train(*args, on_epoch_end=wrapped, **kwargs)

    monkeypatch.setattr(train, "train_model", watching)
    assert main(["train", "--spectra", str(spectra), "--out", str(tmp_path / "m"), "--epochs", "3",
                 "--latent-dim", "2", "--device", "cpu"]) == 0
    assert len(seen_during) == 3
    assert "val deviance/dof" in seen_during[0]
    for epoch, text in enumerate(seen_during, start=1):
        row = rf"^\s+{epoch}\s+-?\d+\.\d\d\s+-?\d+\.\d\d\s+\d+\.\d{{3}}$"
        assert re.search(row, text, re.M), (epoch, text)
    assert "train: 3/3 epochs (100%) in" in errors[-1]


def test_epoch_table_is_thinned_by_time() -> None:
    from xmm_pipeline.cli.train import epoch_printer

    clock, out = FakeClock(), io.StringIO()
    progress = Progress("train", "epochs", stream=io.StringIO(), clock=clock)
    progress.note = lambda text: out.write(text + "\n")  # type: ignore[method-assign]
    printer = epoch_printer(progress, 1000, first=3, every_s=10.0, clock=clock)
    for epoch in range(1, 1001):
        clock.now = epoch * 0.1
        printer({"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "val_deviance_per_dof": 1.0})
    epochs = [int(line.split()[0]) for line in out.getvalue().splitlines()[1:]]
    assert epochs[:4] == [1, 2, 3, 103] and epochs[-1] == 1000
    assert len(epochs) == 3 + 9 + 1  # first three, one per 10 s (every 100th epoch), the last


def test_commands_log_progress_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--detections", "30", "--seed", "2", "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    finished = r"^simulate: (\d+)/\1 detections \(100%\) in \d+:\d\d, "
    assert re.search(finished, captured.err, re.M), captured.err
    assert "simulate:" not in captured.out
    assert main(["preprocess", "--archive", str(tmp_path / "a"), "--out", str(tmp_path / "s"),
                 "--min-counts", "50"]) == 0
    assert re.search(r"^preprocess: (\d+)/\1 spectra \(100%\) in ", capsys.readouterr().err, re.M)
