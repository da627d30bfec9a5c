"""The latent catalogue as the field's tools read it: FITS, VOTable, Parquet or CSV, and SAMP.

One row per detection of a latent folder (`latent.build.LatentLayout`): identifiers, position, date,
counts, hardness ratios, the latent mean, the fit quality, the outlier score and rank, the cluster
and the class. Every column carries a unit and a UCD (IVOA UCD1+, checked against astropy's list), so
TOPCAT and Aladin find RA/Dec (`pos.eq.ra;meta.main`), the epoch (`time.epoch`, MJD in TT) and the
identifiers without being told. FITS gets TUNITn, TUCDn and TCOMMn (the keywords TOPCAT writes and
reads) plus TIMESYS/MJDREF/TIMEUNIT; VOTable gets unit, ucd and description on each FIELD and a
TIMESYS element the epoch column refers to.

`table_from_frame` does the same for any table of the latent commands (`similar`, `outliers`,
`trajectory`), `samp_sender` hands a written VOTable to the running SAMP hub.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin
from urllib.request import pathname2url

import numpy as np
import pandas as pd

from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.build import LatentLayout
from xmm_pipeline.latent.embed import latent_columns
from xmm_pipeline.latent.products import UNKNOWN_CLASS
from xmm_pipeline.storage import atomic_path

FORMATS = ("fits", "votable", "parquet", "csv")
SUFFIXES = {"fits": ".fits", "votable": ".vot", "parquet": ".parquet", "csv": ".csv"}
TIME_SCALE = "TT"  # XMM-Newton times (MJD_START/STOP of the catalogue) are Terrestrial Time
TIMESYS_ID = "time_frame"
SAMP_TABLE_MTYPE = "table.load.votable"


@dataclass(frozen=True)
class Column:
    """What a column means: its unit (astropy/VOUnit string, None if dimensionless), UCD, description."""

    unit: str | None
    ucd: str
    description: str


COLUMNS: dict[str, Column] = {
    "detid": Column(None, "meta.id;meta.main", "4XMM detection identifier (DETID)"),
    "srcid": Column(None, "meta.id", "4XMM unique source identifier (SRCID)"),
    "iauname": Column(None, "meta.id", "IAU name of the source"),
    "obs_id": Column(None, "meta.id;obs", "XMM-Newton observation identifier"),
    "src_num": Column(None, "meta.number", "source number within the observation (SRC_NUM)"),
    "ra": Column("deg", "pos.eq.ra;meta.main", "right ascension (ICRS)"),
    "dec": Column("deg", "pos.eq.dec;meta.main", "declination (ICRS)"),
    "mjd": Column("d", "time.epoch", "middle of the observation, MJD (TT)"),
    "obs_date": Column(None, "time.epoch;obs", "middle of the observation, calendar date (UTC day)"),
    "pn_filter": Column(None, "meta.code;instr.filter", "EPIC-pn filter"),
    "exposure_s": Column("s", "time.duration;obs.exposure", "EPIC-pn exposure of the spectrum"),
    "pn_8_cts": Column("ct", "phot.count;em.X-ray", "catalogue EPIC-pn counts, 0.2-12 keV (PN_8_CTS)"),
    "net_counts": Column("ct", "phot.count;em.X-ray", "background-subtracted counts, 0.3-10 keV"),
    "total_counts": Column("ct", "phot.count;em.X-ray", "counts in the source region, 0.3-10 keV"),
    "flux_0p3_10kev": Column("mW / m2", "phot.flux;em.X-ray",
                             "energy flux 0.3-10 keV of the unfolded spectrum (1 mW/m2 = 1 erg/cm2/s)"),
    **{f"ep_hr{i}": Column(None, "phot.color;em.X-ray", f"catalogue EPIC hardness ratio HR{i} (EP_HR{i})")
       for i in range(1, 5)},
    "deviance_per_dof": Column(None, "stat.fit.goodness",
                               "Poisson deviance of the model's reconstruction per degree of freedom"),
    "outlier_score": Column(None, "stat.value", "outlier score: mean of the deviance and sparsity "
                                                "percentiles (1 = most unusual)"),
    "outlier_rank": Column(None, "meta.number", "rank by outlier score (1 = most unusual)"),
    "knn_mean_distance": Column(None, "pos.distance;stat.value",
                                "mean latent distance to the 10 nearest other detections"),
    "deviance_percentile": Column(None, "stat.value", "percentile of deviance_per_dof over the folder"),
    "sparsity_percentile": Column(None, "stat.value", "percentile of knn_mean_distance over the folder"),
    "cluster": Column(None, "meta.code.class", "Gaussian-mixture cluster (0 = largest)"),
    "cluster_probability": Column(None, "stat.probability", "probability of the assigned cluster"),
    "class": Column(None, "src.class", "source class (truth table, SIMBAD, or unknown)"),
    "class_source": Column(None, "meta.ref", "where the class comes from: truth, simbad or none"),
    "simbad_main_id": Column(None, "meta.id.cross", "SIMBAD identifier of the matched object"),
    "simbad_otype": Column(None, "src.class", "SIMBAD object type"),
    # the tables of `similar`, `outliers` and `trajectory`
    "query": Column(None, "meta.id", "the query detection (detid and date) or spectrum file"),
    "rank": Column(None, "meta.number", "rank in this table"),
    "neighbour": Column(None, "meta.id", "IAU name of the neighbouring detection"),
    "distance": Column(None, "pos.distance;stat.value", "Euclidean distance in latent space"),
    "counts": Column("ct", "phot.count;em.X-ray", "background-subtracted counts of the spectrum"),
    "step": Column(None, "pos.distance;stat.value", "latent distance from the previous detection"),
    "cumulative_path": Column(None, "pos.distance;stat.value", "latent path length up to this detection"),
}
_LATENT = re.compile(r"^z(\d+)$")


def column_spec(name: str) -> Column | None:
    """The unit, UCD and description of a column name, latent means z0..z{D-1} included."""
    match = _LATENT.match(name)
    if match:
        return Column(None, "stat.param;spect", f"latent mean, dimension {match[1]}")
    return COLUMNS.get(name)


def latent_catalogue(latent_dir: str | Path) -> pd.DataFrame:
    """Every detection of a latent folder with its latent, outlier, cluster and class columns."""
    layout = LatentLayout(Path(latent_dir))
    embeddings = layout.read_embeddings()
    if not layout.outliers.is_file():
        raise UserError(f"{layout.outliers}: no outlier scores; run `xmm-pipeline embed` first")
    z = latent_columns(embeddings)
    keep = [c for c in ("detid", "srcid", "iauname", "obs_id", "src_num", "ra", "dec", "mjd", "pn_filter",
                        "exposure_s", "pn_8_cts", "net_counts", "total_counts") if c in embeddings]
    frame = embeddings[keep].copy()
    if "mjd" in frame:
        frame.insert(frame.columns.get_loc("mjd") + 1, "obs_date", obs_date(frame["mjd"].to_numpy()))
    if "log10_flux" in embeddings:
        frame["flux_0p3_10kev"] = np.power(10.0, embeddings["log10_flux"].to_numpy(np.float64))
    for name in ("ep_hr1", "ep_hr2", "ep_hr3", "ep_hr4"):
        if name in embeddings:
            frame[name] = embeddings[name].to_numpy()
    frame[z] = embeddings[z].to_numpy()
    frame["deviance_per_dof"] = embeddings["deviance_per_dof"].to_numpy(np.float64)
    outliers = pd.read_parquet(layout.outliers, columns=["detid", "rank", "outlier_score",
                                                         "knn_mean_distance"])
    frame = frame.merge(outliers.rename(columns={"rank": "outlier_rank"}), on="detid", how="left")
    if layout.clusters.is_file():
        clusters = pd.read_parquet(layout.clusters, columns=["detid", "cluster", "probability"])
        frame = frame.merge(clusters.rename(columns={"probability": "cluster_probability"}), on="detid",
                            how="left")
    classes = layout.read_classes()
    class_columns = ["class", "source", "simbad_main_id", "simbad_otype"]
    if classes is not None:
        labels = classes[["detid", *[c for c in class_columns if c in classes]]]
        frame = frame.merge(labels.rename(columns={"source": "class_source"}), on="detid", how="left")
    if "class" not in frame:
        frame["class"] = UNKNOWN_CLASS
    frame["class"] = frame["class"].fillna(UNKNOWN_CLASS)
    frame.attrs["model_version"] = str(embeddings["model_version"].iloc[0]) if len(embeddings) else ""
    return frame


def obs_date(mjd: np.ndarray) -> np.ndarray:
    """MJD -> 'YYYY-MM-DD' strings ('' where the MJD is missing)."""
    stamps = pd.Timestamp("1858-11-17") + pd.to_timedelta(pd.Series(mjd, dtype="float64"), unit="D")
    return stamps.dt.strftime("%Y-%m-%d").fillna("").to_numpy(dtype=object)


def table_from_frame(frame: pd.DataFrame, name: str, description: str = ""):
    """An astropy Table of `frame` with the unit and UCD of every known column in `.unit` and `.meta`."""
    from astropy.table import MaskedColumn, Table

    table = Table()
    for column_name in frame.columns:
        values = frame[column_name]
        if values.dtype == object or isinstance(values.dtype, pd.StringDtype):
            table[column_name] = np.array([str(v) for v in values.astype(object).where(values.notna(), "")],
                                          dtype=str)
        elif values.isna().any():
            kind = values.dtype.numpy_dtype if hasattr(values.dtype, "numpy_dtype") else values.dtype
            filled = values.to_numpy(dtype=np.float64 if kind.kind == "f" else kind, na_value=0)
            table[column_name] = MaskedColumn(filled, mask=values.isna().to_numpy())
        else:
            table[column_name] = values.to_numpy()
        spec = column_spec(str(column_name))
        if spec is not None:
            if spec.unit:
                table[column_name].unit = spec.unit
            table[column_name].description = spec.description
            table[column_name].meta["ucd"] = spec.ucd
    table.meta["name"] = name
    table.meta["description"] = description or name
    for key, value in frame.attrs.items():
        table.meta[key] = value
    return table


def write_table(table, path: str | Path, fmt: str) -> Path:
    """Write an astropy Table of `table_from_frame` as fits|votable|parquet|csv, atomically."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{path.parent}: cannot create output folder ({error.strerror})") from None
    try:
        with atomic_path(path) as tmp:
            if fmt == "fits":
                fits_hdul(table).writeto(tmp)
            elif fmt == "votable":
                Path(tmp).write_bytes(votable_bytes(table))
            elif fmt == "parquet":
                _to_pandas(table).to_parquet(tmp, index=False)
            else:
                _to_pandas(table).to_csv(tmp, index=False)
    except OSError as error:
        raise UserError(f"{path}: cannot write ({error.strerror or error})") from None
    return path


def _to_pandas(table) -> pd.DataFrame:
    frame = table.to_pandas()
    frame.attrs = {}
    return frame


def fits_hdul(table):
    """A FITS file of the table: TUNITn from astropy, TUCDn and TCOMMn as TOPCAT writes them, the
    time frame (TIMESYS, MJDREF, TIMEUNIT) of the epoch column."""
    from astropy.io import fits

    plain = table.copy(copy_data=False)
    plain.meta = {}
    hdu = fits.table_to_hdu(plain)
    hdu.name = str(table.meta.get("name", "CATALOGUE"))[:68].upper()
    header = hdu.header
    for i, column in enumerate(table.itercols(), start=1):
        if column.meta.get("ucd"):
            header[f"TUCD{i}"] = column.meta["ucd"]
        if column.description:
            header[f"TCOMM{i}"] = column.description[:68]
    if "mjd" in table.colnames:
        header["TIMESYS"] = (TIME_SCALE, "time scale of the MJD columns")
        header["MJDREF"] = (0.0, "MJD columns are plain MJD")
        header["TIMEUNIT"] = ("d", "unit of the MJD columns")
        header["TREFPOS"] = ("TOPOCENT", "times as observed at the spacecraft")
    if "model_version" in table.meta:
        header["MODELVER"] = (str(table.meta["model_version"])[:40], "version hash of the VAE")
    header["ORIGIN"] = "xmm_pipeline"
    return fits.HDUList([fits.PrimaryHDU(), hdu])


def votable_bytes(table) -> bytes:
    """A VOTable 1.4 document of the table: FIELD unit, ucd and DESCRIPTION; a TIMESYS for the MJD."""
    from astropy.io.votable.tree import Info, TimeSys, VOTableFile

    plain = table.copy(copy_data=False)
    plain.meta = {key: value for key, value in table.meta.items() if key in ("name", "description")}
    plain.convert_unicode_to_bytestring()  # ASCII text: datatype="char", which every reader takes
    votable = VOTableFile.from_table(plain)
    votable.version = "1.4"
    config = {"version": "1.4", "version_1_4_or_later": True}
    resource = votable.resources[0]
    vo_table = resource.tables[0]
    vo_table.name = str(table.meta.get("name", "catalogue"))
    vo_table.description = str(table.meta.get("description", ""))
    for key in ("model_version", "latent_dir"):
        if key in table.meta:
            resource.infos.append(Info(name=key, value=str(table.meta[key])))
    if "mjd" in table.colnames:
        resource.time_systems.append(TimeSys(ID=TIMESYS_ID, timeorigin="MJD-origin", timescale=TIME_SCALE,
                                             refposition="TOPOCENTER", config=config))
    for field in vo_table.fields:
        column = table[field.name]
        field.ucd = column.meta.get("ucd")
        if column.description:
            field.description = column.description
        if field.name == "mjd":
            field.ref = TIMESYS_ID
    buffer = io.BytesIO()
    votable.to_xml(buffer)
    return buffer.getvalue()


def samp_module():
    """astropy's SAMP code: in pyvo.samp since astropy 8 deprecated astropy.samp, else astropy.samp."""
    try:
        import pyvo.samp as samp

        samp.SAMPIntegratedClient  # noqa: B018 (pyvo < 1.7 has only the helpers)
    except (ImportError, AttributeError):
        import astropy.samp as samp
    return samp


@contextmanager
def samp_sender(client_name: str = "xmm-pipeline") -> Iterator[Callable[[str | Path, str], list[str]]]:
    """Connect to the running SAMP hub (its lockfile, or $SAMP_HUB) and yield `send(path, name)`, which
    announces a written VOTable by its file URL to every client that loads tables (TOPCAT, Aladin)
    and returns their names. Checked before anything is written: no hub, or no client that takes
    tables, is a UserError."""
    samp = samp_module()
    client = samp.SAMPIntegratedClient(name=client_name, description="XMM-Newton EPIC-pn latent catalogue",
                                  callable=False)
    try:
        client.connect(pool_size=1)
    except (samp.SAMPHubError, OSError) as error:
        raise UserError(f"no SAMP hub running (start TOPCAT or Aladin first): {error}") from None
    try:
        receivers = client.get_subscribed_clients(SAMP_TABLE_MTYPE)
        if not receivers:
            raise UserError("the SAMP hub has no client that loads tables (start TOPCAT or Aladin)")

        def send(path: str | Path, name: str) -> list[str]:
            url = urljoin("file:", pathname2url(str(Path(path).resolve())))
            client.notify_all({"samp.mtype": SAMP_TABLE_MTYPE,
                               "samp.params": {"url": url, "name": name, "table-id": name}})
            return [str(client.get_metadata(r).get("samp.name", r)) for r in receivers]

        yield send
    finally:
        client.disconnect()
