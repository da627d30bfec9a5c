"""Resources: where the pipeline keeps its files, which archive it reads, and on which device it trains.

Configuration lives here and nowhere else: every value is a field of a ConfigurableResource, bound in
`definitions.py` and overridable per run from the launchpad or a run-config file
(`resources: {storage: {config: {root: ...}}}`).

One IO convention for the whole project: assets write explicit files under `StorageResource.root`
(atomic writes, see `xmm_pipeline.storage`) and report the path as metadata; downstream assets read
the same paths. No asset passes data through an IO manager.

    root/archive/                the archive's local copy (catalogue.parquet, <obs_id>/pps, responses/)
    root/catalogue/detections.parquet, selected.parquet, observations.parquet, selection.json
    root/spectra/                spectra/<obs_id>.parquet, responses.parquet, quarantine.parquet
    root/training/               split.parquet, summary.json
    root/model/                  the model artifact (weights, config, history)
    root/latent/                 embeddings, FAISS index, outliers, trajectories, clusters, maps, classes
    root/reports/                evaluation report and figures
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from xmm_pipeline.archive.base import Archive

DEFAULT_TAP_URL = "https://nxsa.esac.esa.int/tap-server/tap"
DEFAULT_AIO_URL = "https://nxsa.esac.esa.int/nxsa-sl/servlet/data-action-aio"
DEFAULT_RMF_URL = "https://sasdev-xmm.esac.esa.int/pub/ccf/constituents/extras/responses/PN"
DEFAULT_SIMBAD_TAP_URL = "https://simbad.cds.unistra.fr/simbad/sim-tap"


class StorageResource(ConfigurableResource):
    """The storage root under which every asset writes its files (see the module docstring)."""

    root: str = Field(description="Folder holding every product of the pipeline.")

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    @property
    def archive_dir(self) -> Path:
        return self.root_path / "archive"

    @property
    def catalogue_dir(self) -> Path:
        return self.root_path / "catalogue"

    @property
    def detections_path(self) -> Path:
        return self.catalogue_dir / "detections.parquet"

    @property
    def selected_path(self) -> Path:
        return self.catalogue_dir / "selected.parquet"

    @property
    def observations_path(self) -> Path:
        """Per observation: the hash of its catalogue rows, so a new release shows what changed."""
        return self.catalogue_dir / "observations.parquet"

    @property
    def spectra_dir(self) -> Path:
        return self.root_path / "spectra"

    @property
    def training_dir(self) -> Path:
        return self.root_path / "training"

    @property
    def model_dir(self) -> Path:
        return self.root_path / "model"

    @property
    def latent_dir(self) -> Path:
        return self.root_path / "latent"

    @property
    def latent_layout(self):  # -> LatentLayout, imported here: it pulls in faiss, not wanted at load time
        """The latent folder's files, named once in `xmm_pipeline.latent.build.LatentLayout`."""
        from xmm_pipeline.latent.build import LatentLayout

        return LatentLayout(self.latent_dir)

    @property
    def reports_dir(self) -> Path:
        return self.root_path / "reports"


class ArchiveResource(ConfigurableResource):
    """The archive the pipeline reads: the simulated archive (the embedded default) or the XSA.

    Both materialise the same files under `root` (see `xmm_pipeline.archive.base`), so nothing
    downstream knows which one it was.
    """

    kind: Literal["simulated", "xsa"] = Field(default="simulated", description="simulated or xsa")
    root: str = Field(description="Local folder the archive materialises its catalogue and products in.")
    release: str = Field(default="DR14", description="Simulated release: DR14 or DR15.")
    n_detections: int = Field(default=2000, description="Simulated catalogue size (detections).")
    seed: int = Field(default=0, description="Simulation seed; same seed, same DR14 part in every release.")
    tap_url: str = Field(default=DEFAULT_TAP_URL, description="XSA: TAP service of the catalogue.")
    aio_url: str = Field(default=DEFAULT_AIO_URL, description="XSA: AIO servlet serving pipeline products.")
    rmf_url: str = Field(default=DEFAULT_RMF_URL, description="XSA: folder of the canned pn RMFs.")
    tap_table: str = Field(default="", description="XSA: catalogue table (empty: the client's default).")
    catalogue_file: str = Field(default="", description="XSA: a local catalogue FITS file instead of TAP.")
    column_map: str = Field(
        default="",
        description="XSA: catalogue columns served under names no release adapter knows, "
        "'canonical=served,...' (as `xmm-pipeline download --column-map`).",
    )
    rmf_version: str = Field(
        default="", description="XSA: canned-matrix version suffix, e.g. _v22.0 (empty: read Version.txt)."
    )
    observations_table: str = Field(
        default="xsa.v_all_observations",
        description="XSA: table with proprietary_end_date per observation_id (empty: no check).",
    )
    max_concurrency: int = Field(default=4, description="XSA: parallel downloads per process.")
    timeout_s: float = Field(default=60.0, description="XSA: timeout of one request (seconds).")
    retries: int = Field(default=4, description="XSA: retries after a timeout, reset, 5xx or 429.")
    backoff_s: float = Field(default=1.0, description="XSA: first retry delay (doubles per retry, jittered).")
    xsa_release: str = Field(
        default="", description="XSA: release label of the catalogue rows (empty: the IAU name prefix)."
    )
    simbad_tap_url: str = Field(
        default=DEFAULT_SIMBAD_TAP_URL, description="XSA: SIMBAD TAP for source classes."
    )
    crossmatch_radius_arcsec: float = Field(default=5.0, description="Cone radius of the SIMBAD cross-match.")

    def get_archive(self) -> Archive:
        if self.kind == "xsa":
            from xmm_pipeline.archive.xsa import XSAArchive, parse_column_map

            options = {"table": self.tap_table} if self.tap_table else {}
            if self.catalogue_file:
                options["catalogue_file"] = self.catalogue_file
            return XSAArchive(
                self.root,
                tap_url=self.tap_url,
                aio_url=self.aio_url,
                rmf_url=self.rmf_url,
                timeout_s=self.timeout_s,
                max_concurrency=self.max_concurrency,
                retries=self.retries,
                backoff_s=self.backoff_s,
                release=self.xsa_release or None,
                column_map=parse_column_map(self.column_map),
                rmf_version=self.rmf_version or None,
                observations_table=self.observations_table,
                **options,
            )
        from xmm_pipeline.archive.simulated import SimulatedArchive

        return SimulatedArchive(
            self.root, release=self.release, n_detections=self.n_detections, seed=self.seed
        )


class ComputeResource(ConfigurableResource):
    """Where the model trains and encodes: 'auto' picks CUDA, then Apple MPS, then CPU."""

    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    torch_threads: int = Field(default=0, description="CPU threads for torch; 0 leaves torch's default.")


class ModelSettings(ConfigurableResource):
    """Model and training hyper-parameters (defaults: the model package's own defaults).

    The embedded demo and the tests bind smaller values (fewer epochs); a GPU run binds the seed's
    full schedule (max_epochs=25000).
    """

    latent_dim: int = 8
    beta: float = 1.0
    max_epochs: int = 600
    patience: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-4
    val_fraction: float = 0.15
    seed: int = 0
    bf16: bool = Field(default=False, description="CUDA only: bf16 autocast")
    compile: bool = Field(default=False, description="CUDA only: torch.compile of the loss step")

    def vae_config(self):  # -> xmm_pipeline.model.vae.VAEConfig (torch imported lazily)
        from xmm_pipeline.model.vae import VAEConfig

        return VAEConfig(latent_dim=self.latent_dim, beta=self.beta)

    def train_config(self, compute: ComputeResource):  # -> xmm_pipeline.model.train.TrainConfig
        from xmm_pipeline.model.train import TrainConfig

        return TrainConfig(
            max_epochs=self.max_epochs,
            patience=self.patience,
            batch_size=self.batch_size,
            lr=self.learning_rate,
            val_fraction=self.val_fraction,
            seed=self.seed,
            device=compute.device,
            bf16=self.bf16,
            compile=self.compile,
            num_threads=compute.torch_threads or None,
        )
