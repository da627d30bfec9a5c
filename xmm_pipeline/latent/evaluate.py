"""How good is the latent space? Metrics on the simulated truth and the report docs/EVALUATION.md.

- Classification: a k-NN classifier (k = 10) cross-validated with folds grouped by srcid (no source
  on both sides), repeated over CV_REPEATS shuffles of the folds, on the latent means and, as the
  classic baseline, on the four catalogue hardness ratios (missing ratios imputed by the training
  fold's median). The latent means are used as they are, in the Euclidean metric the FAISS index
  searches: the VAE prior already puts every dimension on one scale, and standardising would blow an
  inactive (posterior-collapsed) dimension, whose means are noise of tiny spread, up to the weight of
  an informative one. The hardness ratios are scored both standardised and as they are, and the
  baseline is the better of the two. The verdict is paired: both representations on the same folds,
  so the spread of their difference over the shuffles is the comparison's own noise.
- Similarity: precision@10, the share of each detection's 10 nearest neighbours (other sources only)
  that have its class, in the same metric as the classification.
- The 1ES 1927+654-like source: its soft-state detection(s) (truth `state` names a blackbody, else
  mentions "soft"; without a truth state its lowest-HR2 detection) and their nearest neighbours' classes.
- Outliers: recall of the rare odd spectra (truth `is_odd`) in the top 1% of the outlier score.
- Trajectories: median path length per class, per source with >= 2 detections.
- Latent dimension: the same metrics for models retrained with latent dimension 2, 4, 8.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.spatial import cKDTree

from xmm_pipeline.archive.sources import CHANGING_LOOK_IAUNAME
from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.crossmatch import UNKNOWN
from xmm_pipeline.latent.embed import latent_matrix
from xmm_pipeline.latent.products import (
    KNN_K,
    MapProjection,
    latent_trajectories,
    outlier_scores,
    plot_latent_classes,
    plot_latent_density,
    plot_trajectories,
    save_png,
)
from xmm_pipeline.storage import write_bytes_atomic

HR_COLUMNS = ["ep_hr1", "ep_hr2", "ep_hr3", "ep_hr4"]
ONE_ES_IAUNAME = CHANGING_LOOK_IAUNAME  # the simulated archive gives it the real source's name
SOFT_CLASSES = ("TDE", "NS", "pulsar")
STEADY_CLASS = "AGN"
MOVER_CLASSES = ("TDE", "XRB")
REPORT_FILE = "EVALUATION.md"
IMAGES_SUBDIR = "images"
CV_REPEATS = 5  # shuffles of the grouped folds that the k-NN scores are averaged over


@dataclass
class ClassificationScores:
    """k-NN scores, means over the CV shuffles; `per_repeat_balanced_accuracy` keeps each shuffle's."""

    accuracy: float
    balanced_accuracy: float
    recall_by_class: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0
    per_repeat_balanced_accuracy: list[float] = field(default_factory=list)
    scaling: str = "standardised"  # "standardised" or "as is"


def labelled(embeddings: pd.DataFrame, classes: pd.DataFrame) -> pd.DataFrame:
    """Embeddings joined with their class (and truth columns), rows without a known class dropped."""
    extra = [c for c in classes.columns if c not in embeddings.columns or c == "detid"]
    table = embeddings.merge(classes[extra], on="detid", how="inner")
    table = table[table["class"].notna() & (table["class"].astype(str) != UNKNOWN)].reset_index(drop=True)
    if len(table) < 2 * KNN_K:
        raise UserError(f"only {len(table)} detections with a known class: too few to evaluate")
    return table


def knn_classification(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    k: int = KNN_K,
    n_splits: int = 5,
    seed: int = 0,
    repeats: int = 1,
    standardise: bool = True,
) -> ClassificationScores:
    """k-NN class predictions cross-validated over folds grouped by `groups` (srcid), averaged over
    `repeats` shuffles of the folds (seeds seed, seed + 1, ...); `standardise` scales each feature to
    unit variance on the training fold first."""
    from sklearn.impute import SimpleImputer
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels).astype(str)
    n_splits = min(n_splits, len(np.unique(groups)))
    if n_splits < 2:
        raise UserError("need detections of at least two sources to cross-validate")
    smallest_train = len(labels) - int(np.ceil(len(labels) / n_splits)) - 1
    scaler = [StandardScaler()] if standardise else []
    classifier = make_pipeline(SimpleImputer(strategy="median"), *scaler,
                               KNeighborsClassifier(n_neighbors=max(1, min(k, smallest_train))))
    names = sorted(set(labels))
    accuracy, balanced, recalls = [], [], []
    for repeat_seed in range(seed, seed + max(repeats, 1)):
        predicted = cross_val_predict(classifier, np.asarray(features, dtype=np.float64), labels,
                                      groups=groups, cv=GroupKFold(n_splits, shuffle=True,
                                                                   random_state=repeat_seed))
        accuracy.append(accuracy_score(labels, predicted))
        balanced.append(float(balanced_accuracy_score(labels, predicted)))
        recalls.append(recall_score(labels, predicted, labels=names, average=None, zero_division=0))
    return ClassificationScores(
        accuracy=float(np.mean(accuracy)),
        balanced_accuracy=float(np.mean(balanced)),
        recall_by_class={name: float(r) for name, r in zip(names, np.mean(recalls, axis=0))},
        n_samples=len(labels),
        per_repeat_balanced_accuracy=balanced,
        scaling="standardised" if standardise else "as is",
    )


def hardness_baseline(hardness: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int = 0,
                      repeats: int = CV_REPEATS) -> ClassificationScores:
    """k-NN on the hardness ratios, standardised or as they are, whichever classifies better: the
    latent space is measured against the stronger of the two."""
    variants = [knn_classification(hardness, labels, groups, seed=seed, repeats=repeats, standardise=scaled)
                for scaled in (True, False)]
    return max(variants, key=lambda scores: scores.balanced_accuracy)


def paired_margin(latent: ClassificationScores, baseline: ClassificationScores) -> tuple[float, float]:
    """Mean and standard deviation over the CV shuffles of latent minus baseline balanced accuracy
    (the same folds for both, so the spread is the noise of the comparison itself)."""
    difference = np.subtract(latent.per_repeat_balanced_accuracy, baseline.per_repeat_balanced_accuracy)
    spread = float(difference.std(ddof=1)) if len(difference) > 1 else 0.0
    return float(difference.mean()), spread


def precision_at_k(features: np.ndarray, labels: np.ndarray, srcids: np.ndarray, k: int = KNN_K) -> float:
    """Mean share of same-class detections among each detection's k nearest other-source neighbours."""
    features = np.asarray(features, dtype=np.float64)
    labels, srcids = np.asarray(labels).astype(str), np.asarray(srcids)
    widest = int(pd.Series(srcids).value_counts().max())
    n_query = min(k + widest, len(features))
    _, rows = cKDTree(features).query(features, n_query)
    rows = np.atleast_2d(rows)
    shares = []
    for i, neighbours in enumerate(rows):
        others = neighbours[srcids[neighbours] != srcids[i]][:k]
        if len(others):
            shares.append(np.mean(labels[others] == labels[i]))
    return float(np.mean(shares)) if shares else math.nan


def hardness_ratios(table: pd.DataFrame) -> np.ndarray:
    missing = [c for c in HR_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"embeddings lack the hardness ratios {', '.join(missing)}")
    return table[HR_COLUMNS].to_numpy(np.float64)


def soft_state_neighbours(table: pd.DataFrame, iauname: str = ONE_ES_IAUNAME, k: int = KNN_K) -> pd.DataFrame:
    """Nearest other-source neighbours of the named source's soft-state detection(s)."""
    names = table["iauname"].astype(str).str.strip() if "iauname" in table else pd.Series(dtype=str)
    rows = table[names == iauname]
    if rows.empty:
        return pd.DataFrame()
    soft = pd.Series(False, index=rows.index)
    if "state" in rows:
        state = rows["state"].astype(str).str.lower()
        soft = state.str.contains(r"(?:^|_)bb|blackbody", regex=True)
        if not soft.any():
            soft = state.str.contains("soft")
    if not soft.any():
        soft = rows["ep_hr2"] == rows["ep_hr2"].min() if "ep_hr2" in rows else rows.index == rows.index[0]
    queries = rows[soft]
    vectors = latent_matrix(table).astype(np.float64)
    tree = cKDTree(vectors)
    widest = min(len(table), k + len(rows))
    parts = []
    for _, query in queries.iterrows():
        distances, neighbours = tree.query(latent_matrix(query.to_frame().T).astype(np.float64)[0], widest)
        keep = table["srcid"].to_numpy()[neighbours] != query["srcid"]
        hits = table.iloc[neighbours[keep][:k]].copy()
        hits.insert(0, "distance", distances[keep][:k])
        hits.insert(0, "query_detid", query["detid"])
        hits.insert(1, "query_state", query.get("state", "lowest HR2"))
        parts.append(hits)
    return pd.concat(parts, ignore_index=True)


def outlier_recall(outliers: pd.DataFrame, table: pd.DataFrame, top_fraction: float = 0.01) -> dict[str, Any]:
    """Share of the odd spectra found in the top `top_fraction` of the outlier ranking."""
    is_odd = table["is_odd"].astype(bool) if "is_odd" in table else table["class"] == "odd"
    odd = set(table.loc[is_odd.to_numpy(), "detid"])
    ranked = outliers[outliers["detid"].isin(table["detid"])]
    n_top = max(1, math.ceil(top_fraction * len(ranked)))
    found = odd & set(ranked["detid"].head(n_top))
    return {"n_odd": len(odd), "n_top": n_top, "found": len(found),
            "recall": len(found) / len(odd) if odd else math.nan, "chance": n_top / max(len(ranked), 1)}


def path_lengths_by_class(trajectories: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Median path length (and per step) of multi-detection sources, by the source's majority class."""
    source_class = table.groupby("srcid")["class"].agg(lambda c: c.value_counts().index[0])
    paths = trajectories.assign(**{"class": trajectories["srcid"].map(source_class)}).dropna(subset=["class"])
    paths["path_per_step"] = paths["path_length"] / (paths["n_detections"] - 1)
    summary = paths.groupby("class").agg(
        sources=("srcid", "size"), median_path_length=("path_length", "median"),
        median_path_per_step=("path_per_step", "median"), median_largest_jump=("largest_jump", "median"))
    return summary.sort_values("median_path_length", ascending=False).reset_index()


@dataclass
class LatentMetrics:
    latent_dim: int
    n_detections: int
    knn_latent: ClassificationScores
    knn_hardness: ClassificationScores
    precision_at_10_latent: float
    precision_at_10_hardness: float
    outliers: dict[str, Any]
    path_lengths: pd.DataFrame
    median_deviance_per_dof: float

    def summary_row(self) -> dict[str, Any]:
        paths = self.path_lengths.set_index("class")["median_path_length"] if len(self.path_lengths) else {}
        steady = paths.get(STEADY_CLASS, math.nan) if len(self.path_lengths) else math.nan
        movers = [paths.get(c, math.nan) for c in MOVER_CLASSES] if len(self.path_lengths) else []
        return {
            "latent dim": self.latent_dim,
            "k-NN accuracy": self.knn_latent.accuracy,
            "k-NN balanced accuracy": self.knn_latent.balanced_accuracy,
            "precision@10": self.precision_at_10_latent,
            "odd recall (top 1%)": self.outliers["recall"],
            "TDE+XRB / AGN path": np.nanmedian(movers) / steady if movers and steady > 0 else math.nan,
            "median deviance/dof": self.median_deviance_per_dof,
        }


def latent_metrics(embeddings: pd.DataFrame, classes: pd.DataFrame, seed: int = 0,
                   knn_hardness: ClassificationScores | None = None) -> LatentMetrics:
    """Every latent-space metric of the report for one embeddings table. The hardness-ratio baseline
    does not depend on the model: pass `knn_hardness` from an earlier call on the same detections and
    fold seed to reuse it."""
    table = labelled(embeddings, classes)
    vectors = latent_matrix(table)
    labels, groups = table["class"].astype(str).to_numpy(), table["srcid"].to_numpy()
    hardness = hardness_ratios(table)
    hardness_filled = np.where(np.isfinite(hardness), hardness, np.nanmedian(hardness, axis=0))
    if knn_hardness is None:
        knn_hardness = hardness_baseline(hardness, labels, groups, seed=seed)
    if knn_hardness.scaling == "standardised":
        hardness_filled = _standardised(hardness_filled)
    return LatentMetrics(
        latent_dim=vectors.shape[1],
        n_detections=len(table),
        knn_latent=knn_classification(vectors, labels, groups, seed=seed, repeats=CV_REPEATS,
                                      standardise=False),
        knn_hardness=knn_hardness,
        precision_at_10_latent=precision_at_k(vectors, labels, groups),
        precision_at_10_hardness=precision_at_k(hardness_filled, labels, groups),
        outliers=outlier_recall(outlier_scores(embeddings), table),
        path_lengths=path_lengths_by_class(latent_trajectories(embeddings), table),
        median_deviance_per_dof=float(embeddings["deviance_per_dof"].median()),
    )


def _standardised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    return (features - features.mean(axis=0)) / np.where(features.std(axis=0) > 0, features.std(axis=0), 1)


# --- the report ---------------------------------------------------------------------------------

def _md_table(frame: pd.DataFrame, digits: int = 3) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float | np.floating):
            return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---:" if frame[c].dtype.kind in "fiu" else "---" for c in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _confusion_figure(metrics: LatentMetrics, path: Path) -> Path:
    figure = Figure(figsize=(7.0, 3.4))
    axes = figure.subplots(1, 1)
    names = sorted(metrics.knn_latent.recall_by_class)
    x = np.arange(len(names))
    axes.bar(x - 0.2, [metrics.knn_latent.recall_by_class[n] for n in names], 0.4, label="latent space")
    axes.bar(x + 0.2, [metrics.knn_hardness.recall_by_class.get(n, 0) for n in names], 0.4,
             label="hardness ratios")
    axes.set_xticks(x, names)
    axes.set_ylabel("k-NN recall (grouped CV)")
    axes.set_ylim(0, 1)
    axes.legend(frameon=False, fontsize=8)
    save_png(figure, path)
    return path


def reference_scores(table: pd.DataFrame, features: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """k-NN scores of another representation (`features`: detid + feature columns) on the same rows,
    in the same metric as the latent means (features as they are)."""
    aligned = table[["detid", "class", "srcid"]].merge(features, on="detid", how="inner")
    values = aligned.drop(columns=["detid", "class", "srcid"]).to_numpy(np.float64)
    labels, groups = aligned["class"].astype(str).to_numpy(), aligned["srcid"].to_numpy()
    scores = knn_classification(values, labels, groups, seed=seed, repeats=CV_REPEATS, standardise=False)
    return {"accuracy": scores.accuracy, "balanced accuracy": scores.balanced_accuracy,
            "precision@10": precision_at_k(values, labels, groups)}


def latent_report_sections(
    embeddings: pd.DataFrame,
    classes: pd.DataFrame,
    images_dir: str | Path,
    image_prefix: str = "images/",
    references: dict[str, pd.DataFrame] | None = None,
) -> tuple[str, LatentMetrics]:
    """The latent-space sections of the report (markdown) with their figures written to images_dir.

    `references` adds rows to the classification table: other representations of the same
    detections (label -> frame of detid + feature columns), scored the same way."""
    images = Path(images_dir)
    metrics = latent_metrics(embeddings, classes)
    table = labelled(embeddings, classes)
    projection = MapProjection.fit(latent_matrix(embeddings))
    plot_latent_density(embeddings, images / "latent_density.png", projection)
    plot_latent_classes(embeddings, classes, images / "latent_classes.png", projection)
    _confusion_figure(metrics, images / "latent_knn_recall.png")
    trajectories = latent_trajectories(embeddings)
    movers = trajectories.merge(table.groupby("srcid")["class"].first().rename("class"), on="srcid")
    chosen = [int(s) for c in MOVER_CLASSES for s in movers.loc[movers["class"] == c, "srcid"].head(2)]
    one_es = table.loc[table["iauname"].astype(str).str.strip() == ONE_ES_IAUNAME, "srcid"].unique().tolist()
    chosen += [int(s) for s in one_es if int(s) in set(trajectories["srcid"])]
    if chosen:
        plot_trajectories(embeddings, chosen, images / "latent_trajectories.png", classes, projection)

    latent, hardness = metrics.knn_latent, metrics.knn_hardness
    names = sorted(latent.recall_by_class)
    recall = pd.DataFrame({
        "class": names,
        "detections": [int((table["class"] == c).sum()) for c in names],
        "recall, latent": [latent.recall_by_class[c] for c in names],
        "recall, hardness ratios": [hardness.recall_by_class.get(c, math.nan) for c in names],
    })
    headline = pd.DataFrame({
        "features": [f"latent means ({metrics.latent_dim}-D)", f"hardness ratios (4, {hardness.scaling})"],
        "accuracy": [latent.accuracy, hardness.accuracy],
        "balanced accuracy": [latent.balanced_accuracy, hardness.balanced_accuracy],
        "precision@10": [metrics.precision_at_10_latent, metrics.precision_at_10_hardness],
    })
    for label, features in (references or {}).items():
        headline.loc[len(headline)] = {"features": label, **reference_scores(table, features)}
    margin, spread = paired_margin(latent, hardness)
    verdict = comparison_verdict(margin, spread)
    repeats = len(latent.per_repeat_balanced_accuracy)
    lines = [
        "## Classification in latent space", "",
        f"{metrics.n_detections} detections with a known class; k-NN (k = {KNN_K}) with 5 folds grouped by "
        f"srcid, so no source is on both sides of a split, averaged over {repeats} shuffles of the folds. "
        "Latent means as they are (the metric the FAISS index searches); hardness ratios standardised or "
        "as they are, whichever classifies better.", "",
        _md_table(headline), "",
        f"The latent space **{verdict}** the hardness ratios: balanced accuracy "
        f"{latent.balanced_accuracy:.3f} vs {hardness.balanced_accuracy:.3f} ({margin:+.3f} +- {spread:.3f} "
        f"over the {repeats} paired shuffles, "
        f"{_ratio(latent.balanced_accuracy, hardness.balanced_accuracy)}); accuracy {latent.accuracy:.3f} "
        f"vs {hardness.accuracy:.3f} ({latent.accuracy - hardness.accuracy:+.3f}). The spread is the noise "
        "of the folds alone; retraining the model with another seed moves the latent score too.",
        "", _md_table(recall), "", f"![k-NN recall by class]({image_prefix}latent_knn_recall.png)", "",
        f"![latent map by class]({image_prefix}latent_classes.png) "
        f"![latent density]({image_prefix}latent_density.png)", "",
    ]
    lines += ["## Similar spectra", "",
              f"Precision@10 (share of the 10 nearest other-source neighbours with the query's class): "
              f"{metrics.precision_at_10_latent:.3f} in latent space, "
              f"{metrics.precision_at_10_hardness:.3f} on the hardness ratios.", ""]
    neighbours = soft_state_neighbours(table)
    if len(neighbours):
        mix = neighbours["class"].value_counts()
        first_query = neighbours["query_detid"].iloc[0]
        soft_share = float(neighbours["class"].isin(SOFT_CLASSES).mean())
        hr2_median = float(np.nanmedian(table["ep_hr2"])) if "ep_hr2" in table else math.nan
        softer = float((neighbours["ep_hr2"] < hr2_median).mean()) if "ep_hr2" in neighbours else math.nan
        shown = [c for c in ["query_detid", "query_state", "distance", "iauname", "class", "state", "ep_hr2"]
                 if c in neighbours]
        n_queries = neighbours["query_detid"].nunique()
        lines += [f"Neighbours of the 1ES 1927+654-like source ({ONE_ES_IAUNAME}) in its soft state "
                  f"({n_queries} detections x {KNN_K} neighbours): "
                  + ", ".join(f"{n} {c}" for c, n in mix.items())
                  + f". {soft_share:.0%} are TDE / neutron-star classes; {softer:.0%} are softer (HR2) "
                  f"than the median detection (HR2 median {hr2_median:.2f}). The first soft-state "
                  "detection's neighbours:", "",
                  _md_table(neighbours.loc[neighbours["query_detid"] == first_query, shown]), ""]
    else:
        lines += [f"The 1ES 1927+654-like source ({ONE_ES_IAUNAME}) is not among the labelled "
                  "detections.", ""]
    odd = metrics.outliers
    lines += ["## Outliers", "",
              "Outlier score = mean of the percentile ranks of the reconstruction deviance per dof and "
              f"the mean distance to the {KNN_K} nearest latent neighbours. Of {odd['n_odd']} odd spectra, "
              f"{odd['found']} are in the top 1% ({odd['n_top']} detections): recall {_fmt(odd['recall'])} "
              f"(chance: {odd['chance']:.3f}).", ""]
    lines += ["## Trajectories", "",
              "Median latent path length of sources with two or more detections, by class (path per step "
              "divides by the number of steps, so sources observed more often are not favoured):", "",
              _md_table(metrics.path_lengths), ""]
    if chosen:
        lines += [f"![latent trajectories]({image_prefix}latent_trajectories.png)", ""]
    return "\n".join(lines), metrics


def comparison_verdict(margin: float, spread: float) -> str:
    """'beats' only when the mean paired margin exceeds the spread of the single-shuffle margins."""
    if margin > spread:
        return "beats"
    if margin < -spread:
        return "does not beat"
    return "ties with (within the noise of the folds)"


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def evaluate_latent_space(embeddings: pd.DataFrame, classes: pd.DataFrame, out_dir: str | Path) -> str:
    """Latent-space evaluation of one embeddings table: out_dir/EVALUATION.md and out_dir/images/."""
    out = Path(out_dir)
    sections, _ = latent_report_sections(embeddings, classes, out / IMAGES_SUBDIR)
    version = str(embeddings["model_version"].iloc[0])
    text = (f"# Latent-space evaluation\n\nModel version `{version}`, {len(embeddings)} detections.\n\n"
            f"{sections}")
    write_bytes_atomic(out / REPORT_FILE, text.encode())
    return text


def latent_dimension_study(
    dataset, classes: pd.DataFrame, work_dir: Path, latent_dims: list[int], artifact,
    max_epochs: int | None = None, seed: int = 0, training_seeds: int = 3,
) -> pd.DataFrame:
    """Retrain the model at each latent dimension with the artifact's own architecture and training
    settings (epochs capped at `max_epochs` when given), `training_seeds` times from the artifact's
    training seed on, and measure each space (folds shuffled from `seed`): means over the training
    seeds, and the spread of the k-NN balanced accuracy, which moves with the training seed more than
    with the folds."""
    from xmm_pipeline.latent.embed import embed_dataset
    from xmm_pipeline.model.train import TrainConfig, load_artifact, train_model
    from xmm_pipeline.model.vae import VAEConfig

    base = artifact.train_config.to_dict()
    epochs = base["max_epochs"] if max_epochs is None else min(max_epochs, base["max_epochs"])
    rows, knn_hardness = [], None
    for dim in latent_dims:
        model_config = VAEConfig.from_dict({**artifact.config.to_dict(), "latent_dim": dim})
        per_seed = []
        for offset in range(max(training_seeds, 1)):
            training_seed = base["seed"] + offset
            train_config = TrainConfig.from_dict({**base, "max_epochs": epochs, "seed": training_seed})
            name = f"latent_dim_{dim}" if offset == 0 else f"latent_dim_{dim}_seed{training_seed}"
            result = train_model(dataset, work_dir / name, model_config, train_config)
            embeddings = embed_dataset(load_artifact(result.artifact_dir), dataset)
            metrics = latent_metrics(embeddings, classes, seed=seed, knn_hardness=knn_hardness)
            knn_hardness = metrics.knn_hardness
            per_seed.append({**metrics.summary_row(),
                             "active dims": active_dimensions(embeddings),
                             "HR balanced accuracy": metrics.knn_hardness.balanced_accuracy})
        frame = pd.DataFrame(per_seed)
        row = frame.drop(columns="latent dim").mean().to_dict()
        balanced = frame["k-NN balanced accuracy"]
        row["balanced accuracy spread"] = float(balanced.std(ddof=1)) if len(frame) > 1 else 0.0
        row["seeds above HR"] = f"{int((balanced > frame['HR balanced accuracy']).sum())}/{len(frame)}"
        rows.append({"latent dim": dim, "training seeds": len(frame), **row})
    columns = ["latent dim", "training seeds", "active dims", "k-NN accuracy", "k-NN balanced accuracy",
               "balanced accuracy spread", "HR balanced accuracy", "seeds above HR", "precision@10",
               "odd recall (top 1%)", "TDE+XRB / AGN path", "median deviance/dof"]
    return pd.DataFrame(rows)[columns]


def active_dimensions(embeddings: pd.DataFrame, min_kl_nats: float = 0.1) -> int:
    """Latent dimensions the model uses: mean KL(q(z_d | x) || N(0, 1)) over the detections above
    `min_kl_nats` (an unused, posterior-collapsed dimension has ~0: its means sit at 0, variance 1)."""
    mu = latent_matrix(embeddings).astype(np.float64)
    logvar = embeddings[[f"logvar{d}" for d in range(mu.shape[1])]].to_numpy(np.float64)
    kl = 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar).mean(axis=0)
    return int((kl > min_kl_nats).sum())


def unfolded_pca_features(dataset, n_components: int) -> pd.DataFrame:
    """The first principal components of the encoder's input (the scaled unfolded spectra): a linear
    reference telling how much of the classification the representation itself already carries."""
    from sklearn.decomposition import PCA

    scores = PCA(n_components, random_state=0).fit_transform(np.asarray(dataset.unfolded, dtype=np.float64))
    frame = pd.DataFrame(scores, columns=[f"pc{i}" for i in range(n_components)])
    frame.insert(0, "detid", dataset.meta["detid"].to_numpy(np.int64))
    return frame


def write_evaluation_report(
    archive_dir: str | Path,
    spectra_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    latent_dims: list[int] | tuple[int, ...] = (2, 4, 8),
    max_epochs: int | None = None,
    work_dir: str | Path = "results/evaluation",
    seed: int = 0,
    baseline_epochs: int | None = None,
    training_seeds: int = 3,
) -> Path:
    """Write out_dir/EVALUATION.md and out_dir/images/*.png from the archive's truth, the spectra and
    the model: reconstruction (model.evaluate), latent-space metrics, and the latent-dimension study.

    Baselines train with the model's own training settings unless `baseline_epochs` caps their epochs;
    the models of the latent-dimension study and the baselines are kept in work_dir, so a rerun with
    the same inputs trains nothing."""
    from xmm_pipeline.latent.crossmatch import source_classes
    from xmm_pipeline.latent.embed import embed_dataset
    from xmm_pipeline.model.evaluate import evaluate_reconstruction
    from xmm_pipeline.model.train import TrainConfig, load_artifact, split_by_source
    from xmm_pipeline.spectra.dataset import load_dataset

    out, work = Path(out_dir), Path(work_dir)
    images = out / IMAGES_SUBDIR
    artifact = load_artifact(model_dir)
    dataset = load_dataset(spectra_dir)
    embeddings = embed_dataset(artifact, dataset)
    classes = source_classes(embeddings, archive_dir=archive_dir)
    if classes["class"].eq(UNKNOWN).all():
        raise UserError(f"{archive_dir}: no truth classes for the embedded detections; evaluation needs the "
                        "simulated archive's truth.parquet")
    class_of = classes.set_index("detid")["class"]

    train_rows, test_rows = split_by_source(dataset.meta["srcid"].to_numpy(),
                                            artifact.train_config.val_fraction, artifact.train_config.seed)
    test_ds = dataset.subset(test_rows)
    baseline_config = None
    if baseline_epochs is not None:
        baseline_config = TrainConfig.from_dict({**artifact.train_config.to_dict(),
                                                 "max_epochs": baseline_epochs})
    reconstruction_md, _ = evaluate_reconstruction(
        dataset.subset(train_rows), test_ds, artifact, work / "reconstruction",
        classes=class_of.reindex(test_ds.meta["detid"]).fillna(UNKNOWN).tolist(),
        train_config=baseline_config)
    figure = work / "reconstruction" / "reconstructions.png"
    if figure.is_file():
        images.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, images / "reconstructions.png")
        reconstruction_md = reconstruction_md.replace("](reconstructions.png)",
                                                      f"]({IMAGES_SUBDIR}/reconstructions.png)")

    latent_md, metrics = latent_report_sections(
        embeddings, classes, images, references={
            f"PCA of the unfolded spectra ({artifact.config.latent_dim} components, diagnostic)":
                unfolded_pca_features(dataset, artifact.config.latent_dim)})
    lines = [
        "# Evaluation", "",
        f"Produced by `xmm-pipeline evaluate` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: simulated archive "
        f"`{archive_dir}` ({len(dataset)} spectra of {dataset.meta['srcid'].nunique()} sources), model "
        f"`{artifact.version}` (latent dimension {artifact.config.latent_dim}). Classes are the simulated "
        "truth, never an input of training.", "",
        "## Reconstruction", "", reconstruction_md, "", latent_md,
    ]
    lines += ["## Latent dimension", ""]
    if latent_dims:
        study = latent_dimension_study(dataset, classes, work, list(latent_dims), artifact, max_epochs, seed,
                                       training_seeds)
        cap = "" if max_epochs is None else f", at most {max_epochs} epochs"
        lines += [f"Models retrained with the evaluated model's architecture and training settings (early "
                  f"stopping{cap}) at each latent dimension, {training_seeds} times with different "
                  "training seeds; the same metrics on each space, means over the seeds (the spread is "
                  "the standard deviation of the k-NN balanced accuracy over the seeds; 'seeds above HR' "
                  "counts the models whose balanced accuracy exceeds the hardness-ratio baseline); active "
                  "dims have a mean KL above 0.1 nats; deviance on all spectra.", "",
                  _md_table(study), ""]
    else:
        lines += ["Skipped in this run (`--skip-latent-dims`).", ""]
    text = "\n".join(lines)
    write_bytes_atomic(out / REPORT_FILE, text.encode())
    write_bytes_atomic(work / "latent_metrics.json", pd.Series(
        {k: v for k, v in asdict(metrics).items() if k != "path_lengths"}).to_json(indent=1).encode())
    return out / REPORT_FILE
