"""Latent products: outlier scores, trajectories, clusters and maps, from an embeddings table.

All functions take the embeddings table of `latent.embed` (plus, where named, a class table with
columns detid, class) and return pandas frames or write PNG images (matplotlib's Agg canvas, no GUI).

Outlier score. Two signs that a spectrum is unusual: the model cannot reproduce it (high
reconstruction deviance per dof), and few other spectra lie near it in latent space (large mean
distance to its k nearest neighbours, a k-NN density estimate). Each is turned into a percentile rank
over the whole table (0 = most ordinary, 1 = most extreme) and the score is their mean, so neither
unit nor scale of either quantity matters and a spectrum must be unusual in both ways to top the list.

Trajectory. For a source (srcid) with two or more detections: its latent means in time (mjd) order;
path length = sum of the Euclidean steps between consecutive detections, largest jump = the longest
single step (with the detections and dates at its ends), displacement = first to last.

Clusters. A Gaussian mixture (full covariances) fitted for 1..max_components components, the number
chosen by the lowest Bayesian information criterion; each detection goes to its most probable
component. Fitted on a random sample of at most `fit_sample` rows so the cost is bounded.

Maps. Two-dimensional latent spaces are drawn as they are; higher-dimensional ones on their first two
principal components (`MapProjection`), the same projection for every figure of one embeddings table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.embed import latent_matrix
from xmm_pipeline.latent.search import LatentIndex, build_index
from xmm_pipeline.storage import atomic_path

KNN_K = 10
CLASS_COLOURS = {
    "AGN": "#1f77b4", "star": "#ff7f0e", "CV": "#2ca02c", "XRB": "#d62728", "ULX": "#9467bd",
    "NS": "#8c564b", "pulsar": "#e377c2", "TDE": "#17becf", "odd": "#000000", "other": "#bcbd22",
}
UNKNOWN_CLASS = "unknown"


# --- outliers -----------------------------------------------------------------------------------

def knn_mean_distance(
    vectors: np.ndarray, detids: np.ndarray, k: int = KNN_K, latent_index: LatentIndex | None = None
) -> np.ndarray:
    """Mean Euclidean distance of each vector to its k nearest other indexed vectors."""
    if latent_index is None:
        latent_index = build_index(vectors, detids)
    k = min(k, len(vectors) - 1)
    if k < 1:
        return np.zeros(len(vectors))
    distances, ids = latent_index.search(vectors, k + 1)
    is_self = ids == np.asarray(detids, dtype=np.int64)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True  # self lost among ties at distance 0: drop the farthest instead
    first_self = is_self.argmax(axis=1)
    keep = np.ones_like(is_self)
    keep[np.arange(len(ids)), first_self] = False
    others = distances[keep].reshape(len(ids), k)
    return others.mean(axis=1)


def outlier_scores(
    embeddings: pd.DataFrame, k: int = KNN_K, latent_index: LatentIndex | None = None
) -> pd.DataFrame:
    """Every detection ranked by the outlier score (most unusual first), with its two ingredients."""
    if len(embeddings) == 0:
        raise UserError("no embeddings to score")
    vectors = latent_matrix(embeddings)
    detids = embeddings["detid"].to_numpy(np.int64)
    knn = knn_mean_distance(vectors, detids, k, latent_index)
    deviance = embeddings["deviance_per_dof"].to_numpy(np.float64)
    if not np.isfinite(deviance).all():
        raise UserError("embeddings hold non-finite deviance per dof")
    keep = [c for c in ("detid", "srcid", "iauname", "obs_id", "mjd", "net_counts") if c in embeddings]
    frame = embeddings[keep].copy()
    frame["deviance_per_dof"] = deviance
    frame["knn_mean_distance"] = knn
    frame["deviance_percentile"] = pd.Series(deviance).rank(pct=True).to_numpy()
    frame["sparsity_percentile"] = pd.Series(knn).rank(pct=True).to_numpy()
    frame["outlier_score"] = 0.5 * (frame["deviance_percentile"] + frame["sparsity_percentile"])
    frame = frame.sort_values(["outlier_score", "detid"], ascending=[False, True]).reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


# --- trajectories -------------------------------------------------------------------------------

def trajectory_points(embeddings: pd.DataFrame, srcid: int) -> pd.DataFrame:
    """One source's detections in time order with their latent means and the step to each."""
    rows = embeddings[embeddings["srcid"] == int(srcid)].sort_values(["mjd", "detid"]).reset_index(drop=True)
    if rows.empty:
        raise UserError(f"source {srcid} is not in the embeddings")
    vectors = latent_matrix(rows).astype(np.float64)
    steps = np.r_[0.0, np.linalg.norm(np.diff(vectors, axis=0), axis=1)]
    rows["step"] = steps
    rows["cumulative_path"] = np.cumsum(steps)
    return rows


def latent_trajectories(embeddings: pd.DataFrame) -> pd.DataFrame:
    """Per source with >= 2 detections: path length, largest jump and its ends, sorted by path length."""
    columns = ["srcid", "iauname", "n_detections", "mjd_first", "mjd_last", "path_length", "largest_jump",
               "jump_from_detid", "jump_to_detid", "jump_mjd_from", "jump_mjd_to", "displacement"]
    ordered = embeddings.sort_values(["srcid", "mjd", "detid"]).reset_index(drop=True)
    srcid = ordered["srcid"].to_numpy(np.int64)
    if len(ordered) < 2:
        return pd.DataFrame(columns=columns)
    vectors = latent_matrix(ordered).astype(np.float64)
    same = srcid[1:] == srcid[:-1]
    steps = pd.DataFrame({
        "srcid": srcid[1:][same],
        "step": np.linalg.norm(vectors[1:] - vectors[:-1], axis=1)[same],
        "from_row": np.flatnonzero(same),
    })
    if steps.empty:
        return pd.DataFrame(columns=columns)
    steps["to_row"] = steps["from_row"] + 1
    grouped = steps.groupby("srcid", sort=False)
    jump = steps.loc[grouped["step"].idxmax()].set_index("srcid")
    first_row = grouped["from_row"].min()
    last_row = grouped["to_row"].max()
    detid = ordered["detid"].to_numpy(np.int64)
    mjd = ordered["mjd"].to_numpy(np.float64)
    out = pd.DataFrame({
        "srcid": first_row.index.to_numpy(np.int64),
        "iauname": ordered["iauname"].to_numpy()[first_row] if "iauname" in ordered else "",
        "n_detections": (last_row - first_row + 1).to_numpy(),
        "mjd_first": mjd[first_row],
        "mjd_last": mjd[last_row],
        "path_length": grouped["step"].sum().to_numpy(),
        "largest_jump": jump["step"].to_numpy(),
        "jump_from_detid": detid[jump["from_row"].to_numpy()],
        "jump_to_detid": detid[jump["to_row"].to_numpy()],
        "jump_mjd_from": mjd[jump["from_row"].to_numpy()],
        "jump_mjd_to": mjd[jump["to_row"].to_numpy()],
        "displacement": np.linalg.norm(vectors[last_row.to_numpy()] - vectors[first_row.to_numpy()], axis=1),
    })
    return out.sort_values(["path_length", "srcid"], ascending=[False, True]).reset_index(drop=True)[columns]


# --- clusters -----------------------------------------------------------------------------------

@dataclass
class ClusterResult:
    assignments: pd.DataFrame  # detid, cluster, probability
    summary: pd.DataFrame  # cluster, n_detections, share, centre z*, class_<name> counts
    bic: pd.DataFrame  # n_components, bic


def fit_clusters(
    embeddings: pd.DataFrame,
    classes: pd.DataFrame | None = None,
    max_components: int = 10,
    fit_sample: int = 20_000,
    seed: int = 0,
) -> ClusterResult:
    """Gaussian-mixture clusters with the BIC-chosen number of components, and their class mix."""
    from sklearn.mixture import GaussianMixture

    vectors = latent_matrix(embeddings).astype(np.float64)
    n_rows = len(vectors)
    if n_rows < 2:
        raise UserError("need at least two embeddings to cluster")
    rng = np.random.default_rng(seed)
    fit_rows = vectors if n_rows <= fit_sample else vectors[rng.choice(n_rows, fit_sample, replace=False)]
    models, bics = [], []
    for n_components in range(1, min(max_components, len(fit_rows)) + 1):
        model = GaussianMixture(n_components, covariance_type="full", random_state=seed, reg_covar=1e-5)
        model.fit(fit_rows)
        models.append(model)
        bics.append(model.bic(fit_rows))
    best = models[int(np.argmin(bics))]
    probabilities = best.predict_proba(vectors)
    labels = probabilities.argmax(axis=1)
    # Number clusters by size (0 = largest) so labels are stable and readable.
    order = np.argsort(-np.bincount(labels, minlength=best.n_components), kind="stable")
    relabel = np.empty_like(order)
    relabel[order] = np.arange(len(order))
    labels = relabel[labels]
    assignments = pd.DataFrame({
        "detid": embeddings["detid"].to_numpy(np.int64),
        "cluster": labels.astype(np.int32),
        "probability": probabilities.max(axis=1),
    })
    summary = pd.DataFrame({"cluster": np.arange(best.n_components, dtype=np.int32)})
    summary["n_detections"] = np.bincount(labels, minlength=best.n_components)
    summary["share"] = summary["n_detections"] / n_rows
    centres = best.means_[order]
    for d in range(centres.shape[1]):
        summary[f"centre_z{d}"] = centres[:, d]
    if classes is not None:
        labelled = assignments.merge(classes[["detid", "class"]], on="detid", how="left")
        labelled["class"] = labelled["class"].fillna(UNKNOWN_CLASS)
        mix = pd.crosstab(labelled["cluster"], labelled["class"]).reindex(summary["cluster"], fill_value=0)
        for name in mix.columns:
            summary[f"class_{name}"] = mix[name].to_numpy()
        summary["majority_class"] = mix.idxmax(axis=1).to_numpy()
        summary["majority_share"] = (mix.max(axis=1) / mix.sum(axis=1).clip(lower=1)).to_numpy()
    bic = pd.DataFrame({"n_components": np.arange(1, len(bics) + 1), "bic": bics})
    return ClusterResult(assignments, summary, bic)


# --- maps ---------------------------------------------------------------------------------------

@dataclass
class MapProjection:
    """Latent vectors -> the 2-D plane of the maps (identity for D = 2, top principal components above)."""

    mean: np.ndarray
    components: np.ndarray  # [2, D]
    axis_labels: tuple[str, str]

    @classmethod
    def fit(cls, vectors: np.ndarray) -> MapProjection:
        vectors = np.asarray(vectors, dtype=np.float64)
        dim = vectors.shape[1]
        if dim == 1:
            return cls(np.zeros(1), np.array([[1.0], [0.0]]), ("z0", "-"))
        if dim == 2:
            return cls(np.zeros(2), np.eye(2), ("z0", "z1"))
        mean = vectors.mean(axis=0)
        _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
        return cls(mean, vt[:2], ("latent PC1", "latent PC2"))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(np.asarray(vectors, dtype=np.float64)) - self.mean) @ self.components.T


def _extent(points: np.ndarray) -> tuple[float, float, float, float]:
    low = np.percentile(points, 0.5, axis=0)
    high = np.percentile(points, 99.5, axis=0)
    pad = 0.08 * np.maximum(high - low, 1e-6)
    return float(low[0] - pad[0]), float(high[0] + pad[0]), float(low[1] - pad[1]), float(high[1] + pad[1])


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically (every latent figure goes through here)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _density_axes(figure: Figure, points: np.ndarray, labels: tuple[str, str], cmap: str = "viridis"):
    axes = figure.add_subplot(1, 1, 1)
    x0, x1, y0, y1 = _extent(points)
    bins = int(np.clip(np.sqrt(len(points)) / 1.5, 20, 150))
    histogram, xe, ye = np.histogram2d(points[:, 0], points[:, 1], bins=bins, range=[[x0, x1], [y0, y1]])
    image = axes.pcolormesh(xe, ye, np.ma.masked_equal(histogram.T, 0), cmap=cmap,
                            norm=LogNorm(vmin=1, vmax=max(histogram.max(), 2)), shading="auto")
    axes.set_xlim(x0, x1)
    axes.set_ylim(y0, y1)
    axes.set_xlabel(labels[0])
    axes.set_ylabel(labels[1])
    return axes, image


def plot_latent_density(
    embeddings: pd.DataFrame, path: str | Path, projection: MapProjection | None = None
) -> Path:
    """Heatmap of the number of detections per latent cell (log colour scale)."""
    vectors = latent_matrix(embeddings)
    projection = projection or MapProjection.fit(vectors)
    figure = Figure(figsize=(6.4, 5.2))
    axes, image = _density_axes(figure, projection(vectors), projection.axis_labels)
    figure.colorbar(image, ax=axes, label="detections per cell")
    axes.set_title(f"Latent density ({len(vectors)} detections)")
    return save_png(figure, path)


def plot_latent_classes(
    embeddings: pd.DataFrame, classes: pd.DataFrame, path: str | Path, projection: MapProjection | None = None
) -> Path:
    """The latent map with each detection coloured by its class (unknown in grey, underneath)."""
    vectors = latent_matrix(embeddings)
    projection = projection or MapProjection.fit(vectors)
    points = projection(vectors)
    labelled = embeddings[["detid"]].merge(classes[["detid", "class"]], on="detid", how="left")
    names = labelled["class"].fillna(UNKNOWN_CLASS).to_numpy()
    figure = Figure(figsize=(6.4, 5.2))
    axes = figure.add_subplot(1, 1, 1)
    order = [UNKNOWN_CLASS, *sorted(set(names) - {UNKNOWN_CLASS}, key=lambda n: -np.sum(names == n))]
    size = float(np.clip(2000 / np.sqrt(max(len(points), 1)), 1, 20))
    for name in order:
        rows = names == name
        if rows.any():
            axes.scatter(points[rows, 0], points[rows, 1], s=size, lw=0, alpha=0.7,
                         color=CLASS_COLOURS.get(name, "#b0b0b0"), label=f"{name} ({rows.sum()})")
    x0, x1, y0, y1 = _extent(points)
    axes.set_xlim(x0, x1)
    axes.set_ylim(y0, y1)
    axes.set_xlabel(projection.axis_labels[0])
    axes.set_ylabel(projection.axis_labels[1])
    axes.legend(loc="best", fontsize=7, markerscale=2, frameon=False)
    axes.set_title("Latent map by class")
    return save_png(figure, path)


def plot_trajectories(
    embeddings: pd.DataFrame,
    srcids: list[int],
    path: str | Path,
    classes: pd.DataFrame | None = None,
    projection: MapProjection | None = None,
) -> Path:
    """Paths of the given sources (time-ordered, arrow at the last step) over the latent density map."""
    return save_png(trajectory_figure(embeddings, srcids, classes, projection), path)


def trajectory_figure(
    embeddings: pd.DataFrame,
    srcids: list[int],
    classes: pd.DataFrame | None = None,
    projection: MapProjection | None = None,
) -> Figure:
    """The trajectory map: each path starts at an open square and ends with a filled arrowhead on its
    latest step (a fixed size in points, so a short step still shows its direction), drawn above the
    lines; the axes grow to hold every path, even one far outside the bulk of the density."""
    vectors = latent_matrix(embeddings)
    projection = projection or MapProjection.fit(vectors)
    figure = Figure(figsize=(6.8, 5.4))
    axes, _ = _density_axes(figure, projection(vectors), projection.axis_labels, cmap="Greys")
    class_of = dict(zip(classes["detid"], classes["class"], strict=False)) if classes is not None else {}
    colours = [f"C{i % 10}" for i in range(len(srcids))]
    drawn = []
    for colour, srcid in zip(colours, srcids):
        points = trajectory_points(embeddings, srcid)
        xy = projection(latent_matrix(points))
        drawn.append(xy)
        name = str(points["iauname"].iloc[0]) if "iauname" in points else str(srcid)
        label = f"{name} [{class_of.get(int(points['detid'].iloc[0]), '')}]".replace(" []", "")
        axes.plot(xy[:, 0], xy[:, 1], "-o", color=colour, ms=3, lw=1.2, label=label, zorder=3)
        axes.plot(xy[:1, 0], xy[:1, 1], "s", mfc="white", mec=colour, ms=6, mew=1.3, zorder=4)
        if len(xy) >= 2:
            axes.annotate("", xy=tuple(xy[-1]), xytext=tuple(xy[-2]), annotation_clip=False, zorder=5,
                          arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.5, "mutation_scale": 16,
                                      "shrinkA": 0, "shrinkB": 0})
    if drawn:
        _include(axes, np.concatenate(drawn))
    axes.legend(loc="best", fontsize=6, frameon=False, title="open square = first detection",
                title_fontsize=6)
    axes.set_title("Latent trajectories (time order, arrow = latest step)")
    return figure


def _include(axes, points: np.ndarray) -> None:
    """Widen the axes limits (never narrow them) to hold `points`, with a margin where widened."""
    for limits, set_limits, values in ((axes.get_xlim(), axes.set_xlim, points[:, 0]),
                                       (axes.get_ylim(), axes.set_ylim, points[:, 1])):
        low, high = min(limits[0], values.min()), max(limits[1], values.max())
        pad = 0.04 * (high - low)
        set_limits(low - pad if low < limits[0] else low, high + pad if high > limits[1] else high)


def plot_reconstruction(
    energy_edges_kev: np.ndarray,
    counts: np.ndarray,
    background: np.ndarray,
    expected_counts: np.ndarray,
    path: str | Path,
    title: str = "",
    valid: np.ndarray | None = None,
) -> Path:
    """Observed counts per keV against the folded model (source + background), with Poisson residuals;
    bins outside `valid` (masked: not fitted) are left blank."""
    widths_kev = np.diff(energy_edges_kev)
    centres_kev = np.sqrt(energy_edges_kev[:-1] * energy_edges_kev[1:])
    keep = np.ones(len(widths_kev), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    counts = np.where(keep, np.asarray(counts, dtype=np.float64), np.nan)
    expected = np.where(keep, np.asarray(expected_counts, dtype=np.float64), np.nan)
    background = np.where(keep, np.asarray(background, dtype=np.float64), np.nan)
    figure = Figure(figsize=(6.8, 5.6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.errorbar(centres_kev, counts / widths_kev, yerr=np.sqrt(np.maximum(counts, 1)) / widths_kev,
                 fmt=".", ms=3, color="k", lw=0.6, label="observed counts")
    top.stairs(expected / widths_kev, energy_edges_kev, color="C3", label="folded model + bkg")
    top.stairs(background / widths_kev, energy_edges_kev, color="C0", lw=0.8, label="background")
    top.set_xscale("log")
    top.set_yscale("log")
    top.set_ylabel("counts / keV")
    top.legend(fontsize=7, frameon=False)
    top.set_title(title)
    residual = (counts - expected) / np.sqrt(np.maximum(expected, 1e-3))
    bottom.stairs(residual, energy_edges_kev, color="k", lw=0.8)
    bottom.axhline(0, color="C3", lw=0.8)
    bottom.set_xlabel("energy (keV)")
    bottom.set_ylabel("(n - mu)/sqrt(mu)")
    return save_png(figure, path)
