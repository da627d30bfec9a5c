"""What the explorer shows, as plain data: one latent folder read once, answered per click.

`ExplorerData` holds the embeddings, classes, outlier ranks, clusters and the FAISS index of a latent
folder (`xmm_pipeline.latent.build`), and the map plane of its figures (`MapProjection`, the same
projection as map_density.png). Every answer is a dict of numbers and strings for the web page:

- the map: positions of every detection, a colour field (class, outlier score, hardness ratio, counts,
  observation date, deviance, cluster) and a density image binned on the server (`density`);
- a detection: its catalogue row; its spectrum with the model's folded reconstruction, background
  and residuals, computed as `xmm-pipeline show` does (the artifact's own `reconstruct` and
  `deviance_per_dof` on the detection's row of the spectra folder); its k nearest other-source
  neighbours (`latent.query.neighbour_table`) with their scaled unfolded spectra for the overlay;
- the outlier ranking, a source's trajectory with its spectra per epoch, and a user's spectrum
  file preprocessed by `spectra.preprocess.spectrum_to_dataset` and encoded like `similar --spectrum`.

Detections are addressed by their row in the embeddings table (the point index of the map), so the
page never handles 64-bit ids as JavaScript numbers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.build import LatentLayout
from xmm_pipeline.latent.embed import latent_columns, latent_matrix
from xmm_pipeline.latent.fit_quality import fit_quality
from xmm_pipeline.latent.products import CLASS_COLOURS, UNKNOWN_CLASS, MapProjection, trajectory_points
from xmm_pipeline.latent.query import counts_column, neighbour_table, obs_date, resolve_target
from xmm_pipeline.spectra.dataset import (
    SPECTRA_SUBDIR,
    SpectralDataset,
    dataset_from_table,
    read_responses,
)

DEFAULT_K = 10
MAX_K = 100
DENSITY_BINS = 200
SPECTRA_CACHE_OBS = 512
UNKNOWN_COLOUR = "#b0b0b0"
CATEGORICAL = ("class", "cluster")


def jsonable(value: Any) -> Any:
    """Numpy scalars as Python numbers, NaN and inf as None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            values = value.astype(np.float64).astype(object)
            values[~np.isfinite(value)] = None
            return values.tolist()
        return jsonable(value.tolist())
    if isinstance(value, np.integer | bool | np.bool_):
        return value.item() if hasattr(value, "item") else value
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [jsonable(r) for r in frame.to_dict(orient="records")]


def spectrum_payload(dataset: SpectralDataset, expected_counts: np.ndarray, deviance_per_dof: float,
                     title: str) -> dict[str, Any]:
    """The content of `show`'s figure as arrays: counts, folded model + background and background per
    keV on the energy grid, and the Poisson residuals (n - mu)/sqrt(mu) of plot_reconstruction; masked
    bins are NaN (null in JSON), as the figure leaves them out."""
    edges_kev = dataset.grid.edges_kev
    widths_kev = np.diff(edges_kev)
    counts = dataset.counts[0].astype(np.float64)
    expected = np.asarray(expected_counts, dtype=np.float64)
    background = dataset.background[0].astype(np.float64)
    masked = ~dataset.valid[0]  # bins left out of the fit (flagged or unfed channels) are not drawn
    counts, expected, background = (np.where(masked, np.nan, a) for a in (counts, expected, background))
    return {
        "title": title,
        "deviance_per_dof": float(deviance_per_dof),
        "energy_edges_kev": edges_kev,
        "energy_kev": np.sqrt(edges_kev[:-1] * edges_kev[1:]),
        "counts_per_kev": counts / widths_kev,
        "counts_error_per_kev": np.sqrt(np.maximum(counts, 1)) / widths_kev,
        "model_per_kev": expected / widths_kev,
        "background_per_kev": background / widths_kev,
        "residuals": (counts - expected) / np.sqrt(np.maximum(expected, 1e-3)),
        "total_counts": float(np.nansum(counts)),
    }


def _numpy_backed(frame: pd.DataFrame) -> pd.DataFrame:
    """Arrow-backed columns (strings read from Parquet) as numpy ones: a click takes a few rows of a
    table of up to 10^6, and Arrow's take and to_numpy cost milliseconds per column per call."""
    arrow = [c for c in frame.columns if frame[c].dtype != object and (
        isinstance(frame[c].dtype, pd.ArrowDtype | pd.StringDtype) or "pyarrow" in str(frame[c].dtype))]
    return frame.astype({c: object for c in arrow}) if arrow else frame


def _one_thread():
    """One torch thread for one spectrum: on a shared machine more threads only wait for each other."""
    from xmm_pipeline.model.train import torch_threads

    return torch_threads(1)


class ExplorerData:
    """A latent folder opened for browsing; the spectra folder and model default to the manifest's."""

    def __init__(self, latent_dir: str | Path, spectra_dir: str | Path | None = None,
                 model_dir: str | Path | None = None) -> None:
        self.layout = LatentLayout(Path(latent_dir))
        if not self.layout.embeddings.is_file():
            raise UserError(f"{self.layout.embeddings}: no embeddings; run `xmm-pipeline demo` or "
                            "`xmm-pipeline embed` first, or pass --latent")
        manifest = self.layout.read_manifest()
        self.embeddings = _numpy_backed(self.layout.read_embeddings().reset_index(drop=True))
        self.detids = self.embeddings["detid"].to_numpy(np.int64)
        self._row_of = pd.Index(self.detids)
        self.index = self.layout.load_index()
        self.classes = self.layout.read_classes()
        spectra_dir = spectra_dir or manifest.get("spectra_dir")
        model_dir = model_dir or manifest.get("model_dir")
        self.spectra_dir = Path(spectra_dir) if spectra_dir else None
        self.model_dir = Path(model_dir) if model_dir else None
        self.model_version = str(self.embeddings["model_version"].iloc[0]) if len(self.embeddings) else ""
        vectors = latent_matrix(self.embeddings)
        self.projection = MapProjection.fit(vectors)
        self.xy = self.projection(vectors).astype(np.float32)
        self.class_name = self._per_row(self.classes, "class", UNKNOWN_CLASS).astype(str)
        outliers = pd.read_parquet(self.layout.outliers) if self.layout.outliers.is_file() else None
        self.outliers = outliers
        self.outlier_score = self._per_row(outliers, "outlier_score", np.nan).astype(np.float64)
        self.outlier_rank = self._per_row(outliers, "rank", -1).astype(np.int64)
        clusters = pd.read_parquet(self.layout.clusters) if self.layout.clusters.is_file() else None
        self.cluster = self._per_row(clusters, "cluster", -1).astype(np.int64)
        self._lock = threading.Lock()
        self._artifact = None
        self._spectra: OrderedDict[str, SpectralDataset] = OrderedDict()
        self._responses = None

    def _per_row(self, table: pd.DataFrame | None, column: str, missing: Any) -> np.ndarray:
        if table is None or column not in table:
            return np.full(len(self.detids), missing, dtype=object if isinstance(missing, str) else None)
        values = table.drop_duplicates("detid").set_index("detid")[column].reindex(self.detids)
        return values.fillna(missing).to_numpy()

    # --- the map ---------------------------------------------------------------------------------

    def colour_fields(self) -> dict[str, str]:
        """Colour choices this folder can offer: field -> label."""
        fields = {"class": "class", "outlier_score": "outlier score"}
        fields |= {f"ep_hr{i}": f"hardness ratio HR{i}" for i in range(1, 5)
                   if f"ep_hr{i}" in self.embeddings}
        if counts_column(self.embeddings):
            fields["log10_counts"] = f"log10 counts ({counts_column(self.embeddings)})"
        fields["obs_year"] = "observation date (year)"
        fields["deviance_per_dof"] = "deviance / dof"
        if (self.cluster >= 0).any():
            fields["cluster"] = "cluster"
        return fields

    def meta(self) -> dict[str, Any]:
        names = sorted(set(self.class_name.tolist()) - {UNKNOWN_CLASS},
                       key=lambda n: (-int(np.sum(self.class_name == n)), n))
        names = [*names, UNKNOWN_CLASS] if (self.class_name == UNKNOWN_CLASS).any() else names
        return jsonable({
            "n_detections": len(self.detids),
            "n_sources": int(self.embeddings["srcid"].nunique()),
            "latent_dim": len(latent_columns(self.embeddings)),
            "axis_labels": list(self.projection.axis_labels),
            "model_version": self.model_version,
            "latent_dir": str(self.layout.root),
            "has_spectra": self.spectra_dir is not None and self.spectra_dir.is_dir(),
            "has_model": self.model_dir is not None and self.model_dir.is_dir(),
            "colour_fields": self.colour_fields(),
            "classes": [{"name": n, "colour": CLASS_COLOURS.get(n, UNKNOWN_COLOUR),
                         "count": int(np.sum(self.class_name == n))} for n in names],
            "default_k": DEFAULT_K,
        })

    def colour(self, field: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Per-row values of a colour field as float32 (category codes for class and cluster)."""
        if field not in self.colour_fields():
            choices = ", ".join(self.colour_fields())
            raise UserError(f"unknown colour field {field!r}; choose one of {choices}")
        if field == "class":
            names = [c["name"] for c in self.meta()["classes"]]
            codes = pd.Categorical(self.class_name, categories=names).codes
            colours = [CLASS_COLOURS.get(n, UNKNOWN_COLOUR) for n in names]
            return codes.astype(np.float32), {"kind": "category", "labels": names, "colours": colours}
        if field == "cluster":
            labels = sorted(set(self.cluster.tolist()))
            codes = pd.Categorical(self.cluster, categories=labels).codes
            return codes.astype(np.float32), {"kind": "category", "labels": [str(c) for c in labels],
                                              "colours": [f"hsl({(37 * i) % 360},65%,45%)" for i in labels]}
        if field == "outlier_score":
            values = self.outlier_score
        elif field == "log10_counts":
            values = np.log10(np.maximum(self.embeddings[counts_column(self.embeddings)].to_numpy(float), 1))
        elif field == "obs_year":
            values = 2000.0 + (self.embeddings["mjd"].to_numpy(float) - 51544.0) / 365.25
        else:
            values = self.embeddings[field].to_numpy(float)
        values = values.astype(np.float32)
        finite = values[np.isfinite(values)]
        low, high = (np.percentile(finite, [1, 99]) if len(finite) else (0.0, 1.0))
        return values, {"kind": "continuous", "label": self.colour_fields()[field],
                        "min": float(low), "max": float(high)}

    def density(self, bins: int | None = None) -> dict[str, Any]:
        """Detections per cell of the map on a bins x bins grid (log10, empty cells None); by default
        sqrt(N)/1.5 cells a side (20..DENSITY_BINS), as the density PNG of the latent folder."""
        bins = bins or int(np.clip(np.sqrt(len(self.xy)) / 1.5, 20, DENSITY_BINS))
        low = np.percentile(self.xy, 0.2, axis=0)
        high = np.percentile(self.xy, 99.8, axis=0)
        pad = 0.1 * np.maximum(high - low, 1e-6)
        histogram, xe, ye = np.histogram2d(self.xy[:, 0], self.xy[:, 1], bins=bins,
                                           range=[[low[0] - pad[0], high[0] + pad[0]],
                                                  [low[1] - pad[1], high[1] + pad[1]]])
        with np.errstate(divide="ignore"):
            log_counts = np.where(histogram.T > 0, np.log10(histogram.T), np.nan)
        return jsonable({"x": 0.5 * (xe[1:] + xe[:-1]), "y": 0.5 * (ye[1:] + ye[:-1]), "z": log_counts,
                         "max": float(np.log10(max(histogram.max(), 1)))})

    # --- one detection ---------------------------------------------------------------------------

    def row(self, row: int) -> int:
        if not 0 <= int(row) < len(self.detids):
            raise UserError(f"row {row} is not a detection of this map (0..{len(self.detids) - 1})")
        return int(row)

    def rows_of(self, detids: np.ndarray) -> np.ndarray:
        return self._row_of.get_indexer(np.asarray(detids, dtype=np.int64))

    def catalogue_row(self, row: int) -> dict[str, Any]:
        record = self.embeddings.iloc[self.row(row)]
        skip = {c for c in self.embeddings if c.startswith("logvar")}
        out = {c: record[c] for c in self.embeddings.columns if c not in skip}
        out["obs_date"] = obs_date([record["mjd"]]).iloc[0]
        out["class"] = self.class_name[row]
        out["outlier_score"] = self.outlier_score[row]
        out["outlier_rank"] = self.outlier_rank[row]
        if self.cluster[row] >= 0:
            out["cluster"] = self.cluster[row]
        out["map_x"], out["map_y"] = self.xy[row]
        return jsonable(out)

    def search(self, target: str) -> list[dict[str, Any]]:
        """The detections a target names (IAU name, detid or srcid), in time order."""
        rows = resolve_target(self.embeddings, target).sort_values(["mjd", "detid"])
        return [{"row": int(i), "detid": int(r["detid"]), "srcid": int(r["srcid"]),
                 "iauname": str(r.get("iauname", "")), "obs_date": obs_date([r["mjd"]]).iloc[0]}
                for i, r in rows.iterrows()]

    def _need(self, what: str) -> None:
        if what == "spectra" and (self.spectra_dir is None or not self.spectra_dir.is_dir()):
            where = self.spectra_dir or "none in the manifest"
            raise UserError(f"no spectra folder ({where}); pass --spectra")
        if what == "model" and (self.model_dir is None or not self.model_dir.is_dir()):
            raise UserError(f"no model artifact ({self.model_dir or 'none in the manifest'}); pass --model")

    def artifact(self):
        self._need("model")
        with self._lock:
            if self._artifact is None:
                from xmm_pipeline.model.train import load_artifact

                self._artifact = load_artifact(self.model_dir)
            return self._artifact

    def _read_observations(self, obs_ids: list[str]) -> dict[str, SpectralDataset]:
        """Per-observation files of the spectra folder, read as `load_dataset` reads them but with the
        responses table read once per session and no listing of the whole folder per click."""
        if self._responses is None:
            self._responses = read_responses(self.spectra_dir)
        out = {}
        for obs_id in obs_ids:
            path = self.spectra_dir / SPECTRA_SUBDIR / f"{obs_id}.parquet"
            if path.is_file():
                out[obs_id] = dataset_from_table(pq.read_table(path), self._responses, path)
        return out

    def spectra_of(self, rows: np.ndarray) -> SpectralDataset:
        """The spectra folder's rows of these detections (in the order given), observations cached."""
        self._need("spectra")
        rows = np.asarray(rows, dtype=np.int64)
        obs_ids = [str(o) for o in self.embeddings["obs_id"].to_numpy()[rows]]
        with self._lock:
            missing = sorted(set(obs_ids) - set(self._spectra))
            self._spectra.update(self._read_observations(missing))
            while len(self._spectra) > SPECTRA_CACHE_OBS:
                self._spectra.popitem(last=False)
            picks = []
            for row, obs_id in zip(rows, obs_ids):
                dataset = self._spectra.get(obs_id)
                match = [] if dataset is None else np.flatnonzero(
                    dataset.meta["detid"].to_numpy(np.int64) == self.detids[row])
                if len(match) == 0:
                    raise UserError(f"detection {self.detids[row]} not found in {self.spectra_dir}")
                picks.append((dataset, int(match[0])))
        first = picks[0][0]
        take = {name: np.stack([getattr(d, name)[i] for d, i in picks])
                for name in ("counts", "background", "area_exposure", "rmf_index", "unfolded", "valid")}
        return SpectralDataset(grid=first.grid, rmf_matrices=first.rmf_matrices, rmf_ids=first.rmf_ids,
                               model_grid=first.model_grid,
                               meta=pd.concat([d.meta.iloc[[i]] for d, i in picks], ignore_index=True),
                               **take)

    def reconstruction(self, row: int) -> dict[str, Any]:
        """The detection's spectrum and the model's folded reconstruction, as `xmm-pipeline show`."""
        row = self.row(row)
        one = self.spectra_of(np.array([row]))
        artifact = self.artifact()
        with self._lock, _one_thread():
            expected = artifact.reconstruct(one)[0]
            deviance = float(artifact.deviance_per_dof(one, expected[None])[0])
        detid = int(self.detids[row])
        name = str(one.meta["iauname"].iloc[0]) if "iauname" in one.meta else str(detid)
        obs_id = self.embeddings["obs_id"].iloc[row]
        title = f"{name}  detid {detid}  obs {obs_id}  deviance/dof {deviance:.2f}"
        return jsonable(spectrum_payload(one, expected, deviance, title))

    def neighbours(self, vector: np.ndarray, exclude: set[int], k: int, label: str) -> pd.DataFrame:
        if not 1 <= int(k) <= MAX_K:
            raise UserError(f"k must be between 1 and {MAX_K}, got {k}")
        table = neighbour_table(self.embeddings, None, self.index, np.atleast_2d(vector), [label],
                                [exclude], int(k), detid_index=self._row_of)
        table["row"] = self.rows_of(table["detid"].to_numpy())
        table["class"] = self.class_name[table["row"]]
        table["map_x"], table["map_y"] = self.xy[table["row"]].T
        return table

    def overlay(self, rows: np.ndarray, names: list[str], query: np.ndarray | None = None) -> dict[str, Any]:
        """Scaled unfolded spectra (E^2 flux over its mean, the encoder's input) of the query and rows."""
        spectra = self.spectra_of(rows).unfolded if len(rows) else np.zeros((0, 0))
        lines = [] if query is None else [{"name": "query", "values": query}]
        lines += [{"name": n, "values": v} for n, v in zip(names, spectra)]
        grid = self.artifact().grid if query is not None else self.spectra_of(rows[:1]).grid
        return jsonable({"energy_kev": grid.centres_kev, "lines": lines})

    def detection(self, row: int, k: int = DEFAULT_K) -> dict[str, Any]:
        """Everything the page shows for one picked detection."""
        row = self.row(row)
        srcid = int(self.embeddings["srcid"].iloc[row])
        same_source = set(self.detids[self.embeddings["srcid"].to_numpy(np.int64) == srcid].tolist())
        table = self.neighbours(latent_matrix(self.embeddings.iloc[[row]])[0], same_source, k,
                                str(self.detids[row]))
        out: dict[str, Any] = {"row": row, "catalogue": self.catalogue_row(row),
                               "neighbours": records(table.drop(columns="query")),
                               "n_source_detections": len(same_source)}
        try:
            out["spectrum"] = self.reconstruction(row)
            own = self.spectra_of(np.array([row])).unfolded[0]
            overlay = self.overlay(table["row"].to_numpy(), table["neighbour"].astype(str).tolist(), own)
            overlay["lines"][0]["name"] = str(out["catalogue"].get("iauname", self.detids[row]))
            out["overlay"] = overlay
        except UserError as error:
            out["spectrum_error"] = str(error)
        return out

    # --- lists ----------------------------------------------------------------------------------

    def outlier_list(self, n: int = 100) -> list[dict[str, Any]]:
        if self.outliers is None:
            raise UserError(f"{self.layout.outliers}: no outlier scores; run `xmm-pipeline embed` first")
        head = self.outliers.head(max(1, min(int(n), 1000))).copy()
        head["row"] = self.rows_of(head["detid"].to_numpy())
        head["class"] = self.class_name[head["row"]]
        if "mjd" in head:
            head["obs_date"] = obs_date(head["mjd"].to_numpy()).to_numpy()
        keep = [c for c in ("rank", "row", "detid", "iauname", "obs_date", "class", "outlier_score",
                            "deviance_per_dof", "knn_mean_distance") if c in head]
        return records(head[keep])

    def trajectory(self, srcid: int) -> dict[str, Any]:
        """A source's detections in time order on the map, with their spectra per epoch."""
        points = trajectory_points(self.embeddings, int(srcid))
        rows = self.rows_of(points["detid"].to_numpy())
        dates = obs_date(points["mjd"].to_numpy()).tolist()
        out: dict[str, Any] = {
            "srcid": int(srcid), "iauname": str(points["iauname"].iloc[0]) if "iauname" in points else "",
            "rows": rows, "detids": points["detid"].to_numpy(np.int64), "obs_date": dates,
            "map_x": self.xy[rows, 0], "map_y": self.xy[rows, 1], "step": points["step"].to_numpy(),
            "path_length": float(points["cumulative_path"].iloc[-1]),
        }
        try:
            spectra = self.spectra_of(rows)
            out["energy_kev"] = spectra.grid.centres_kev
            out["epochs"] = [{"name": d, "values": v} for d, v in zip(dates, spectra.unfolded)]
        except UserError as error:
            out["spectrum_error"] = str(error)
        return jsonable(out)

    # --- a user's spectrum ------------------------------------------------------------------------

    def place_spectrum(self, spectrum: Path, background: Path | None = None, arf: Path | None = None,
                       rmf: Path | None = None, k: int = DEFAULT_K) -> dict[str, Any]:
        """A spectrum file preprocessed as the pipeline does, encoded, placed on the map with its
        neighbours, its reconstruction and fit quality (deviance/dof and its percentile here)."""
        from xmm_pipeline.spectra.preprocess import spectrum_to_dataset

        artifact = self.artifact()
        dataset = spectrum_to_dataset(spectrum, background, arf, rmf, grid=artifact.grid)
        with self._lock, _one_thread():
            mu, _ = artifact.encode(dataset)
            expected = artifact.reconstruct(dataset)[0]
            deviance = float(artifact.deviance_per_dof(dataset, expected[None])[0])
        name = Path(spectrum).name
        table = self.neighbours(mu[0], set(), k, name)
        xy = self.projection(mu)[0]
        if "deviance_per_dof" not in self.embeddings:
            raise UserError(f"{self.layout.root}: no deviance_per_dof in the embeddings; embed again")
        quality = fit_quality(deviance, self.embeddings["deviance_per_dof"].to_numpy(float))
        title = f"{name}  {dataset.meta['iauname'].iloc[0]}  deviance/dof {deviance:.2f}"
        out = {
            "name": name, "latent": mu[0], "map_x": float(xy[0]), "map_y": float(xy[1]),
            "deviance_per_dof": deviance,
            "deviance_percentile": 1.0 - quality.share_worse,
            "fit": quality.line(),
            "fit_warning": quality.warning(),
            "spectrum": spectrum_payload(dataset, expected, deviance, title),
            "neighbours": records(table.drop(columns="query")),
        }
        try:
            out["overlay"] = self.overlay(table["row"].to_numpy(), table["neighbour"].astype(str).tolist(),
                                          dataset.unfolded[0])
            out["overlay"]["lines"][0]["name"] = name
        except UserError as error:
            out["spectrum_error"] = str(error)
        return jsonable(out)
