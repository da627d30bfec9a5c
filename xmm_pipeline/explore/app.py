"""The explorer's web app: a small ASGI app (Starlette, served by uvicorn) over one `ExplorerData`.

Why this stack: the page needs a map of up to 10^6 points that stays smooth and answers a click with
the detection under the cursor. plotly.js draws the points with WebGL (scattergl: pan, zoom, lasso
and click on 10^6 markers) over a density image binned here on the server, and ships as one local
file in the `plotly` package, so nothing is fetched from the internet. Starlette and uvicorn come
with dagster-webserver already; the app is a dozen JSON routes over plain functions (explore.data),
with no Dash/Bokeh server state to keep in step with a million-point table.

Routes: `/` the page, `/static/*` its script and style, `/vendor/plotly.min.js`; JSON under `/api/`:
meta, colour (binary float32), points (binary float32 x then y), density, detection, search, outliers,
trajectory (of a srcid, or of a row's source: ids above 2^53 do not survive JavaScript), upload
(multipart: spectrum, background, arf, rmf) and export (CSV, FITS, VOTable of the selection);
`/api/show.png` is `xmm-pipeline show`'s own figure. A mistake the user can fix (unknown target,
malformed file) answers 400 with {"error": message}.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from xmm_pipeline.errors import ProductError, UserError
from xmm_pipeline.explore.data import DEFAULT_K, ExplorerData
from xmm_pipeline.explore.selection import FORMATS, selection_frame, write_selection

STATIC_DIR = Path(__file__).with_name("static")
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
UPLOAD_FIELDS = ("spectrum", "background", "arf", "rmf")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")


def plotly_js() -> Path:
    """plotly.min.js as the `plotly` Python package ships it (no CDN)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise UserError(f"{path}: plotly.min.js missing from the plotly package; reinstall plotly")
    return path


class Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()


def _error(error: Exception, status: int = 400) -> Json:
    return Json({"error": str(error)}, status_code=status)


def _int(request: Request, name: str, default: int | None = None) -> int:
    value = request.query_params.get(name)
    if value is None:
        if default is None:
            raise UserError(f"missing parameter {name}")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"parameter {name} must be an integer, got {value!r}") from None


def _safe_name(filename: str | None, fallback: str) -> str:
    """An uploaded file's base name with nothing that could leave the upload folder."""
    name = SAFE_NAME.sub("_", Path(str(filename or "")).name).lstrip(".")
    return name or fallback


def create_app(data: ExplorerData) -> Starlette:
    """The ASGI app over one opened latent folder."""
    plotly_path = plotly_js()

    def handled(compute):
        async def endpoint(request: Request) -> Response:
            try:
                return await run_in_threadpool(compute, request)
            except (UserError, ProductError) as error:
                return _error(error)
        return endpoint

    def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    def vendor_plotly(request: Request) -> Response:
        return FileResponse(plotly_path, media_type="text/javascript")

    def meta(request: Request) -> Response:
        return Json(data.meta())

    def points(request: Request) -> Response:
        xy = np.ascontiguousarray(data.xy.T, dtype="<f4")
        return Response(xy.tobytes(), media_type="application/octet-stream")

    def colour(request: Request) -> Response:
        values, info = data.colour(request.query_params.get("by", "class"))
        return Response(np.asarray(values, dtype="<f4").tobytes(), media_type="application/octet-stream",
                        headers={"X-Colour-Info": json.dumps(info, allow_nan=False)})

    def density(request: Request) -> Response:
        return Json(data.density())

    def detection(request: Request) -> Response:
        return Json(data.detection(_int(request, "row"), _int(request, "k", DEFAULT_K)))

    def search(request: Request) -> Response:
        return Json({"matches": data.search(request.query_params.get("q", ""))})

    def outliers(request: Request) -> Response:
        return Json({"outliers": data.outlier_list(_int(request, "n", 100))})

    def trajectory(request: Request) -> Response:
        if "row" in request.query_params:
            return Json(data.trajectory(int(data.embeddings["srcid"].iloc[data.row(_int(request, "row"))])))
        return Json(data.trajectory(_int(request, "srcid")))

    def show_png(request: Request) -> Response:
        from xmm_pipeline.latent.products import plot_reconstruction

        row = data.row(_int(request, "row"))
        one = data.spectra_of(np.array([row]))
        spectrum = data.reconstruction(row)
        with tempfile.TemporaryDirectory(prefix="xmm-explore-") as folder:
            path = Path(folder) / "show.png"
            model = np.array([np.nan if v is None else v for v in spectrum["model_per_kev"]], dtype=float)
            expected = np.nan_to_num(model * one.grid.widths_kev, nan=1e-30)
            plot_reconstruction(one.grid.edges_kev, one.counts[0], one.background[0], expected, path,
                                spectrum["title"], valid=one.valid[0])
            return Response(path.read_bytes(), media_type="image/png")

    async def export(request: Request) -> Response:
        try:
            body = await request.json()
            fmt = str(body.get("format", "csv"))
            rows = body.get("rows") or []
            if not isinstance(rows, list) or not all(isinstance(r, int) for r in rows):
                raise UserError("rows must be a list of map row numbers")
            frame = await run_in_threadpool(selection_frame, data, rows)
            content = await run_in_threadpool(write_selection, frame, fmt)
        except (UserError, ProductError) as error:
            return _error(error)
        except ValueError as error:
            return _error(UserError(f"export request is not JSON: {error}"))
        media, suffix = FORMATS[fmt]
        name = f"xmm_selection_{len(frame)}.{suffix}"
        return Response(content, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def upload(request: Request) -> Response:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_UPLOAD_BYTES:
            return _error(UserError(f"upload of {size} bytes is over the {MAX_UPLOAD_BYTES} byte limit"), 413)
        try:
            k = _int(request, "k", DEFAULT_K)
            form = await request.form(max_files=len(UPLOAD_FIELDS), max_fields=len(UPLOAD_FIELDS))
            with tempfile.TemporaryDirectory(prefix="xmm-explore-upload-") as folder:
                paths: dict[str, Path] = {}
                for field in UPLOAD_FIELDS:
                    item = form.get(field)
                    if item is None or isinstance(item, str) or not item.filename:
                        continue
                    path = Path(folder) / _safe_name(item.filename, field)
                    path.write_bytes(await item.read())
                    paths[field] = path
                if "spectrum" not in paths:
                    raise UserError("upload needs a spectrum file (an OGIP PHA source spectrum)")
                answer = await run_in_threadpool(
                    data.place_spectrum, paths["spectrum"], paths.get("background"), paths.get("arf"),
                    paths.get("rmf"), k)
        except (UserError, ProductError) as error:
            return _error(error)
        return Json(answer)

    routes = [
        Route("/", index),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/vendor/plotly.min.js", vendor_plotly),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        Route("/api/meta", handled(meta)),
        Route("/api/points", handled(points)),
        Route("/api/colour", handled(colour)),
        Route("/api/density", handled(density)),
        Route("/api/detection", handled(detection)),
        Route("/api/search", handled(search)),
        Route("/api/outliers", handled(outliers)),
        Route("/api/trajectory", handled(trajectory)),
        Route("/api/show.png", handled(show_png)),
        Route("/api/export", export, methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def serve(data: ExplorerData, host: str = "127.0.0.1", port: int = 8050, log_level: str = "warning") -> None:
    """Serve the app until interrupted (uvicorn, one process)."""
    import uvicorn

    uvicorn.run(create_app(data), host=host, port=port, log_level=log_level)
