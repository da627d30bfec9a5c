"""After the Dagster path (what `make demo` runs), the README's `show` and `similar --spectrum` work
on the latent folder with no --spectra/--model: the assets record their inputs as `embed` does."""

import io
from pathlib import Path

import pandas as pd
import pytest
from astropy.io import fits

from xmm_pipeline.cli import main
from xmm_pipeline.latent.build import LatentLayout

pytestmark = pytest.mark.slow


def test_show_and_similar_spectrum_after_the_dagster_path(
    dr14_pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    data = dr14_pipeline / "data"
    layout = LatentLayout(data / "latent")
    manifest = layout.read_manifest()
    assert Path(manifest["spectra_dir"]) == (data / "spectra").resolve()
    assert Path(manifest["model_dir"]) == (data / "model").resolve()
    assert manifest["fingerprint"] is None  # a later `embed` redoes the products rather than trust them

    embeddings = layout.read_embeddings()
    target = embeddings.sort_values("net_counts").iloc[len(embeddings) // 2]
    plot = tmp_path / "show.png"
    assert main(["show", str(target["detid"]), "--plot", str(plot), "--latent", str(layout.root)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG" and "deviance/dof" in capsys.readouterr().out

    archive = data / "archive"
    spectrum = next((archive / target["obs_id"] / "pps").glob(
        f"P{target['obs_id']}PN*SRSPEC0{int(target['src_num']):03X}.FTZ"))
    rmf = next((archive / "responses" / "PN").glob(Path(fits.getheader(spectrum, 1)["RESPFILE"]).stem + "*"))
    assert main(["similar", "--spectrum", str(spectrum), "--rmf", str(rmf), "-k", "3", "--latent",
                 str(layout.root), "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert frame["detid"].iloc[0] == target["detid"]
