"""Reconstruction quality of the VAE+DeepONet against the baselines, as a markdown table and a figure.

The measure is the Poisson deviance per degree of freedom (valid bins - latent_dim - 1) of the observed
counts given the folded, background-added, ML-normalised reconstruction of each held-out spectrum:
~1 for a model as good as the Poisson noise allows. Masked bins (spectra/dataset.py) are left out of the
deviance and of the figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xmm_pipeline.model.baselines import fit_baselines
from xmm_pipeline.model.train import ModelArtifact, TrainConfig, load_artifact
from xmm_pipeline.model.vae import poisson_deviance_per_dof
from xmm_pipeline.spectra.dataset import SpectralDataset
from xmm_pipeline.storage import atomic_path

FIGURE_CLASSES = ("AGN", "star", "XRB", "TDE")
MODEL_LABELS = {"vae_deeponet": "VAE + DeepONet", "mlp": "VAE + MLP decoder (same size)",
                "pca_trunk": "VAE + DeepONet, PCA trunk", "pca": "PCA (latent_dim components)"}


def deviance_summary(deviance: np.ndarray) -> dict[str, float]:
    q25, median, q75, q90 = np.percentile(deviance, [25, 50, 75, 90])
    return {"mean": float(np.mean(deviance)), "q25": float(q25), "median": float(median), "q75": float(q75),
            "q90": float(q90), "n": len(deviance)}


def pick_examples(dataset: SpectralDataset, classes: Sequence[str] | None) -> list[tuple[str, int]]:
    """(label, row) of the brightest spectrum of each figure class; by index where classes are unknown."""
    if classes is None and "class" in dataset.meta.columns:
        classes = dataset.meta["class"].astype(str).tolist()
    totals = dataset.counts.sum(axis=1)
    picked: list[tuple[str, int]] = []
    for name in FIGURE_CLASSES:
        rows = [i for i, c in enumerate(classes or []) if c == name]
        if rows:
            picked.append((name, int(max(rows, key=lambda i: totals[i]))))
    used = {row for _, row in picked}
    spare = [i for i in range(len(dataset)) if i not in used]
    while len(picked) < min(4, len(dataset)) and spare:
        row = spare.pop(0)
        picked.append((f"spectrum {row}", row))
    return picked


def plot_reconstructions(dataset: SpectralDataset, expected: np.ndarray, examples: list[tuple[str, int]],
                         deviance: np.ndarray, path: Path) -> None:
    """Input counts vs the folded model, one panel per example (the seed's reconstruction slides),
    both divided by the spectrum's folded area x exposure x bin width; masked bins are not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    energy = dataset.grid.centres_kev
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), squeeze=False)
    for ax, (label, row) in zip(axes.flat, examples):
        # counts / (folded area x exposure x keV) of each channel bin: the comb that 5 eV channels leave
        # in narrow log bins divides out of data and model alike (an unfolded plot, as in XSPEC)
        matrix = dataset.rmf_matrices[dataset.rmf_index[row]]
        folded = matrix @ (dataset.area_exposure[row] * dataset.model_grid.widths_kev)
        reach = (folded > 1e-6 * folded.max()) & dataset.valid[row]
        counts = dataset.counts[row]
        seen = reach & (counts > 0)
        ax.errorbar(energy[seen], counts[seen] / folded[seen], yerr=np.sqrt(counts[seen]) / folded[seen],
                    fmt=".", ms=3, lw=0.6, color="0.35", label="Input")
        drawn = np.where(reach, folded, np.nan)  # gaps, not lines, across masked bins
        ax.plot(energy, expected[row] / drawn, color="C3", lw=1.4, label="Predicted")
        ax.plot(energy, dataset.background[row] / drawn, color="C0", lw=0.8, ls=":", label="Background")
        name = dataset.meta["iauname"].iloc[row] if "iauname" in dataset.meta.columns else f"row {row}"
        ax.set_title(f"{label}: {name}\ndeviance/dof = {deviance[row]:.2f}", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.3 * float(np.min(counts[seen] / folded[seen])) if seen.any() else None)
        ax.set_xlabel("Energy [keV]")
        ax.set_ylabel("photons cm$^{-2}$ s$^{-1}$ keV$^{-1}$")
    for ax in list(axes.flat)[len(examples):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _format_table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| model | mean | 25% | median | 75% | 90% |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        values = " | ".join(f"{s[key]:.3f}" for key in ("mean", "q25", "median", "q75", "q90"))
        lines.append(f"| {MODEL_LABELS.get(name, name)} | {values} |")
    return lines


def evaluate_reconstruction(
    train_ds: SpectralDataset,
    test_ds: SpectralDataset,
    artifact: ModelArtifact | str | Path,
    out_dir: str | Path,
    *,
    real: dict[str, SpectralDataset] | None = None,
    classes: Sequence[str] | None = None,
    train_config: TrainConfig | None = None,
    figure_name: str = "reconstructions.png",
) -> tuple[str, dict[str, Any]]:
    """Deviance per dof on test_ds of the VAE and the three baselines (fitted on train_ds, the
    artifact's training configuration unless `train_config`), on `real` single spectra, and a figure.

    Returns (markdown section, metrics); the figure goes to out_dir/figure_name, baseline artifacts
    to out_dir/baselines/."""
    out = Path(out_dir)
    artifact = artifact if isinstance(artifact, ModelArtifact) else load_artifact(artifact)
    baselines, pca = fit_baselines(train_ds, artifact.config, train_config or artifact.train_config,
                                   out / "baselines")
    n_fitted = artifact.config.latent_dim + 1
    predictors: dict[str, Callable[[SpectralDataset], np.ndarray]] = {
        "vae_deeponet": artifact.reconstruct, **{k: v.reconstruct for k, v in baselines.items()},
        "pca": lambda ds: pca.reconstruct(ds, artifact.config.norm_iterations)}

    expected = {name: predict(test_ds) for name, predict in predictors.items()}
    deviance = {name: poisson_deviance_per_dof(test_ds.counts, mu, n_fitted, test_ds.valid)
                for name, mu in expected.items()}
    test_metrics = {name: deviance_summary(d) for name, d in deviance.items()}
    examples = pick_examples(test_ds, classes)
    figure = out / figure_name
    plot_reconstructions(test_ds, expected["vae_deeponet"], examples, deviance["vae_deeponet"], figure)

    real_metrics = {
        label: {name: float(poisson_deviance_per_dof(ds.counts, predict(ds), n_fitted, ds.valid).mean())
                for name, predict in predictors.items()}
        for label, ds in (real or {}).items()}

    lines = [f"Model version `{artifact.version}` ({artifact.n_parameters:,} parameters, latent dimension "
             f"{artifact.config.latent_dim}); baselines fitted on the same {len(train_ds)} training spectra; "
             f"{len(test_ds)} held-out spectra. Poisson deviance per degree of freedom "
             f"(valid bins - {n_fitted}), ~1 when the model is as good as the counting noise allows:", "",
             *_format_table(test_metrics), "",
             f"![input counts vs folded reconstruction]({figure_name})", ""]
    if real_metrics:
        lines += ["Real EPIC-pn spectra (encoded, decoded, folded through their own response):", "",
                  "| spectrum | " + " | ".join(MODEL_LABELS[n] for n in predictors) + " |",
                  "|---|" + "---:|" * len(predictors)]
        lines += [f"| {label} | " + " | ".join(f"{v:.2f}" for v in values.values()) + " |"
                  for label, values in real_metrics.items()]
        lines.append("")
    metrics = {"version": artifact.version, "n_train": len(train_ds), "n_test": len(test_ds),
               "test": test_metrics, "real": real_metrics, "figure": str(figure),
               "examples": [{"label": label, "row": row} for label, row in examples]}
    return "\n".join(lines), metrics
