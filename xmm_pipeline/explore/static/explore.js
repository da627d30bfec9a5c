// xmm-pipeline explore: the page. Every request goes to the server that served it (no CDN, no fonts).
"use strict";

const MAP = { density: 0, points: 1, picked: 2, neighbours: 3, trajectory: 4, user: 5 };
const state = { meta: null, n: 0, x: null, y: null, row: null, selection: [], selectionSource: "",
                neighbours: [], timings: {} };
const $ = (id) => document.getElementById(id);

function message(text) { $("message").textContent = text || ""; }

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let text = response.statusText;
    try { text = (await response.json()).error || text; } catch (e) { /* not JSON */ }
    throw new Error(text);
  }
  return response;
}

async function json(path, options) { return (await api(path, options)).json(); }

function fmt(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(4);
  return String(value);
}

function table(element, rows, columns, onPick) {
  element.innerHTML = "";
  if (!rows.length) return;
  const head = element.insertRow();
  for (const c of columns) { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); }
  for (const r of rows) {
    const tr = element.insertRow();
    for (const c of columns) tr.insertCell().textContent = fmt(r[c]);
    if (r.detid !== undefined) tr.dataset.detid = String(r.detid);
    if (r.row !== undefined && r.row >= 0 && onPick) {
      tr.dataset.row = String(r.row);
      tr.className = "pick";
      tr.addEventListener("click", () => onPick(r.row));
    }
  }
}

function stairs(edges, values, positive) {
  const y = Array.from(values, (v) => (positive && !(v > 0) ? null : v));
  y.push(y[y.length - 1]);
  return { x: edges, y: y };
}

// --- the map ---------------------------------------------------------------------------------

function categoricalScale(colours) {
  const n = colours.length, scale = [];
  colours.forEach((c, i) => { scale.push([i / n, c], [(i + 1) / n, c]); });
  if (n === 1) scale.push([1, colours[0]]);
  return scale;
}

async function loadColour(field) {
  const response = await api(`/api/colour?by=${encodeURIComponent(field)}`);
  const info = JSON.parse(response.headers.get("X-Colour-Info"));
  const values = new Float32Array(await response.arrayBuffer());
  const marker = { color: values, size: state.n > 200000 ? 2 : state.n > 20000 ? 3 : 5, opacity: 0.75 };
  const legend = $("legend");
  legend.innerHTML = "";
  if (info.kind === "category") {
    Object.assign(marker, { colorscale: categoricalScale(info.colours), cmin: -0.5,
                            cmax: info.labels.length - 0.5, showscale: false });
    info.labels.forEach((label, i) => {
      const span = document.createElement("span");
      span.innerHTML = `<i style="background:${info.colours[i]}"></i>`;
      span.appendChild(document.createTextNode(label));
      legend.appendChild(span);
    });
  } else {
    Object.assign(marker, { colorscale: "Viridis", cmin: info.min, cmax: info.max, showscale: true,
                            colorbar: { title: { text: info.label, side: "right" }, thickness: 10 } });
  }
  return marker;
}

async function drawMap() {
  const t0 = performance.now();
  const [meta, pointsResponse, density] = await Promise.all([
    json("/api/meta"), api("/api/points"), json("/api/density")]);
  state.meta = meta;
  state.n = meta.n_detections;
  const xy = new Float32Array(await pointsResponse.arrayBuffer());
  state.x = xy.subarray(0, state.n);
  state.y = xy.subarray(state.n, 2 * state.n);
  $("summary").textContent = `${meta.n_detections.toLocaleString()} detections of ` +
    `${meta.n_sources.toLocaleString()} sources, ${meta.latent_dim}-D latent space, model ${meta.model_version.slice(0, 12)}`;
  const select = $("colour-select");
  for (const [field, label] of Object.entries(meta.colour_fields)) select.add(new Option(label, field));
  $("k-input").value = meta.default_k;
  const marker = await loadColour(select.value);
  const traces = [
    { type: "heatmap", x: density.x, y: density.y, z: density.z, colorscale: [[0, "#ececec"], [1, "#3a3a3a"]],
      zmin: 0, zmax: Math.max(density.max, 1), zsmooth: "best", showscale: false, opacity: 0.6,
      hoverinfo: "skip" },
    { type: "scattergl", mode: "markers", x: state.x, y: state.y, marker: marker, name: "detections",
      hovertemplate: "row %{pointNumber}<extra></extra>" },
    { type: "scattergl", mode: "markers", x: [], y: [], name: "picked", hoverinfo: "skip",
      marker: { size: 16, color: "rgba(0,0,0,0)", line: { color: "#d00", width: 3 } } },
    { type: "scattergl", mode: "markers", x: [], y: [], name: "neighbours", customdata: [],
      marker: { size: 9, color: "rgba(0,0,0,0)", line: { color: "#f60", width: 2 } },
      hovertemplate: "neighbour %{text}<extra></extra>", text: [] },
    { type: "scatter", mode: "lines+markers", x: [], y: [], name: "trajectory", customdata: [], text: [],
      line: { color: "#c0f", width: 2 }, marker: { size: 7, color: "#c0f" },
      hovertemplate: "%{text}<extra></extra>" },
    { type: "scatter", mode: "markers", x: [], y: [], name: "your spectrum", hoverinfo: "skip",
      marker: { size: 18, symbol: "star", color: "#ff0", line: { color: "#000", width: 1.5 } } },
  ];
  const layout = {
    margin: { l: 50, r: 10, t: 10, b: 40 }, showlegend: false, dragmode: "zoom", hovermode: "closest",
    xaxis: { title: { text: meta.axis_labels[0] }, zeroline: false },
    yaxis: { title: { text: meta.axis_labels[1] }, zeroline: false },
    uirevision: "map",
  };
  await Plotly.newPlot("map", traces, layout, { displaylogo: false, responsive: true, scrollZoom: true,
    modeBarButtonsToAdd: ["lasso2d", "select2d"] });
  const gd = $("map");
  gd.on("plotly_click", (event) => {
    const p = event.points[0];
    if (!p) return;
    if (p.curveNumber === MAP.points) pick(p.pointIndex);
    else if (p.curveNumber === MAP.neighbours || p.curveNumber === MAP.trajectory) pick(p.customdata);
  });
  gd.on("plotly_selected", (event) => {
    if (!event) return;
    const rows = event.points.filter((p) => p.curveNumber === MAP.points).map((p) => p.pointIndex);
    setSelection(rows, "lasso");
  });
  state.timings.map_ms = performance.now() - t0;
  document.body.dataset.ready = "1";
}

async function recolour() {
  const marker = await loadColour($("colour-select").value);
  Plotly.restyle("map", { marker: [marker] }, [MAP.points]);
}

function setSelection(rows, source) {
  state.selection = rows;
  state.selectionSource = source;
  $("selection-count").textContent = rows.length ? `${rows.length} detections (${source})` : "none";
  $("export-button").disabled = rows.length === 0;
}

// --- one detection ---------------------------------------------------------------------------

function drawSpectrum(spectrum) {
  const model = stairs(spectrum.energy_edges_kev, spectrum.model_per_kev, true);
  const background = stairs(spectrum.energy_edges_kev, spectrum.background_per_kev, true);
  const residuals = stairs(spectrum.energy_edges_kev, spectrum.residuals);
  const traces = [
    { x: spectrum.energy_kev, y: spectrum.counts_per_kev, mode: "markers", name: "observed counts",
      marker: { size: 4, color: "#000" },
      error_y: { type: "data", array: spectrum.counts_error_per_kev, width: 0, thickness: 0.7, color: "#555" } },
    { x: model.x, y: model.y, mode: "lines", line: { shape: "hv", color: "#d62728" }, name: "folded model + bkg" },
    { x: background.x, y: background.y, mode: "lines", line: { shape: "hv", color: "#1f77b4", width: 1 },
      name: "background" },
    { x: residuals.x, y: residuals.y, mode: "lines", line: { shape: "hv", color: "#000", width: 1 },
      xaxis: "x", yaxis: "y2", name: "(n - mu)/sqrt(mu)", showlegend: false },
  ];
  const layout = {
    title: { text: spectrum.title, font: { size: 12 }, x: 0.02, xanchor: "left" },
    margin: { l: 60, r: 10, t: 48, b: 40 },
    xaxis: { type: "log", title: { text: "energy (keV)" } },
    yaxis: { type: "log", title: { text: "counts / keV" }, domain: [0.32, 1] },
    yaxis2: { title: { text: "(n-mu)/sqrt(mu)" }, domain: [0, 0.24], zeroline: true, zerolinecolor: "#d62728" },
    legend: { x: 0.99, xanchor: "right", y: 0.99, font: { size: 10 } },
  };
  return Plotly.react("spectrum", traces, layout, { displaylogo: false, displayModeBar: false, responsive: true });
}

function drawLines(element, energy, lines, title, highlightFirst) {
  const traces = lines.map((line, i) => ({
    x: energy, y: line.values, mode: "lines", name: line.name,
    line: highlightFirst && i === 0 ? { color: "#000", width: 2.5 } : { width: 1 },
  }));
  return Plotly.react(element, traces, {
    title: { text: title, font: { size: 12 }, x: 0.02, xanchor: "left" }, margin: { l: 60, r: 10, t: 48, b: 40 },
    xaxis: { type: "log", title: { text: "energy (keV)" } },
    yaxis: { type: "log", title: { text: "E^2 F(E) / mean (encoder input)" } },
    legend: { font: { size: 9 } },
  }, { displaylogo: false, displayModeBar: false, responsive: true });
}

function showNeighbours(neighbours, overlay, note) {
  state.neighbours = neighbours;
  table($("neighbours"), neighbours,
    ["rank", "neighbour", "detid", "srcid", "distance", "class", "obs_date", "counts"], pick);
  $("spectrum-note").textContent = note || "";
  if (overlay) return drawLines("overlay", overlay.energy_kev, overlay.lines, "Query and neighbours: scaled unfolded spectra", true);
  return Promise.resolve();
}

function markOnMap(picked, neighbours) {
  Plotly.restyle("map", {
    x: [picked ? [picked.map_x] : [], neighbours.map((r) => r.map_x)],
    y: [picked ? [picked.map_y] : [], neighbours.map((r) => r.map_y)],
    customdata: [[], neighbours.map((r) => r.row)], text: [[], neighbours.map((r) => r.neighbour)],
  }, [MAP.picked, MAP.neighbours]);
}

function showCatalogue(record) {
  const rows = Object.entries(record).map(([key, value]) => ({ column: key, value: value }));
  table($("catalogue"), rows, ["column", "value"]);
}

async function pick(row, fromSearch) {
  const t0 = performance.now();
  message("");
  state.row = row;
  const k = Number($("k-input").value) || 10;
  let detail;
  try { detail = await json(`/api/detection?row=${row}&k=${k}`); } catch (error) { message(error.message); return; }
  const t1 = performance.now();
  const c = detail.catalogue;
  const title = $("detection-title");
  title.textContent = `${c.iauname || ""}  detid ${c.detid}  srcid ${c.srcid}  ${c.obs_date}  [${c.class}]`;
  title.dataset.detid = String(c.detid);
  title.dataset.row = String(row);
  showCatalogue(c);
  if (!fromSearch) showMatches([], detail.n_source_detections > 1 ? row : null);
  if (detail.spectrum) await drawSpectrum(detail.spectrum);
  else Plotly.purge("spectrum");
  await showNeighbours(detail.neighbours, detail.overlay, detail.spectrum_error);
  $("spectrum").dataset.detid = String(c.detid);
  setSelection([row, ...detail.neighbours.map((r) => r.row)], "picked + neighbours");
  state.timings.last_pick = { server_ms: t1 - t0, total_ms: performance.now() - t0 };
  // The map (up to 10^6 WebGL points) is redrawn after the panels, so they never wait for it.
  markOnMap(c, detail.neighbours);
  document.body.dataset.picks = String(Number(document.body.dataset.picks || 0) + 1);
}

function showMatches(matches, sourceRow) {
  const box = $("matches");
  box.innerHTML = "";
  if (matches.length > 1) {
    box.appendChild(document.createTextNode(`${matches.length} detections: `));
    for (const m of matches) {
      const button = document.createElement("button");
      button.textContent = `${m.obs_date} (${m.detid})`;
      button.addEventListener("click", () => pick(m.row, true));
      box.appendChild(button);
    }
  }
  if (sourceRow !== null) {
    const button = document.createElement("button");
    button.id = "trajectory-button";
    button.textContent = "Show trajectory";
    button.addEventListener("click", () => trajectory(sourceRow));
    box.appendChild(button);
  }
}

async function search(event) {
  event.preventDefault();
  const text = $("search-input").value.trim();
  if (!text) return;
  let answer;
  try { answer = await json(`/api/search?q=${encodeURIComponent(text)}`); } catch (error) { message(error.message); return; }
  const matches = answer.matches;
  await pick(matches[0].row, true);
  const sameSource = matches.every((m) => m.srcid === matches[0].srcid);
  showMatches(matches, sameSource && matches.length > 1 ? matches[0].row : null);
}

async function trajectory(row) {
  let path;
  try { path = await json(`/api/trajectory?row=${row}`); } catch (error) { message(error.message); return; }
  const n = path.map_x.length;
  Plotly.restyle("map", { x: [path.map_x], y: [path.map_y], customdata: [path.rows],
    text: [path.obs_date.map((d, i) => `${d} (${path.detids[i]})`)] }, [MAP.trajectory]);
  const annotations = n >= 2 ? [{ x: path.map_x[n - 1], y: path.map_y[n - 1], ax: path.map_x[n - 2],
    ay: path.map_y[n - 2], axref: "x", ayref: "y", xref: "x", yref: "y", showarrow: true, arrowhead: 3,
    arrowcolor: "#c0f", arrowwidth: 2, text: "" }] : [];
  Plotly.relayout("map", { annotations: annotations });
  if (path.epochs) {
    drawLines("trajectory-spectra", path.energy_kev, path.epochs,
      `${path.iauname}: spectrum per epoch (path length ${path.path_length.toFixed(2)})`, false);
  } else message(path.spectrum_error || "");
}

// --- lists, upload, export -------------------------------------------------------------------

async function loadOutliers() {
  try {
    const answer = await json("/api/outliers?n=100");
    table($("outliers"), answer.outliers,
      ["rank", "iauname", "detid", "obs_date", "class", "outlier_score", "deviance_per_dof"], pick);
  } catch (error) { message(error.message); }
}

async function upload(event) {
  event.preventDefault();
  if (!$("upload-spectrum").files.length) { message("choose a spectrum file first"); return; }
  const k = Number($("k-input").value) || 10;
  message("placing your spectrum...");
  let answer;
  try {
    answer = await json(`/api/upload?k=${k}`, { method: "POST", body: new FormData($("upload-form")) });
  } catch (error) { message(error.message); return; }
  message(answer.fit_warning || "");
  $("detection-title").textContent = `${answer.name}: placed at (${answer.map_x.toPrecision(3)}, ` +
    `${answer.map_y.toPrecision(3)}), deviance/dof ${answer.deviance_per_dof.toFixed(2)} ` +
    `(worse than ${(100 * answer.deviance_percentile).toFixed(0)}% of the map)`;
  $("detection-title").dataset.detid = "";
  Plotly.restyle("map", { x: [[answer.map_x]], y: [[answer.map_y]] }, [MAP.user]);
  await drawSpectrum(answer.spectrum);
  showNeighbours(answer.neighbours, answer.overlay, answer.spectrum_error);
  markOnMap(null, answer.neighbours);
  showCatalogue({ file: answer.name, map_x: answer.map_x, map_y: answer.map_y,
    deviance_per_dof: answer.deviance_per_dof, deviance_percentile: answer.deviance_percentile,
    latent: answer.latent.map((v) => v.toPrecision(4)).join(", ") });
  setSelection(answer.neighbours.map((r) => r.row), "neighbours of your spectrum");
}

async function exportSelection() {
  const format = $("export-format").value;
  let response;
  try {
    response = await api("/api/export", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ rows: state.selection, format: format }) });
  } catch (error) { message(error.message); return; }
  const name = (response.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = name ? name[1] : `selection.${format}`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  document.body.dataset.exported = link.download;
}

// Page coordinates of a map point (for tests and the benchmark's clicks).
function pagePosition(row) {
  const gd = $("map"), full = gd._fullLayout, box = gd.getBoundingClientRect();
  return { x: box.left + full._size.l + full.xaxis.l2p(state.x[row]),
           y: box.top + full._size.t + full.yaxis.l2p(state.y[row]) };
}

window.explorer = { state: state, pick: pick, pagePosition: pagePosition, trajectory: trajectory };
$("search-form").addEventListener("submit", search);
$("colour-select").addEventListener("change", recolour);
$("density-toggle").addEventListener("change", (e) => Plotly.restyle("map", { visible: e.target.checked }, [MAP.density]));
$("export-button").addEventListener("click", exportSelection);
$("clear-button").addEventListener("click", () => { setSelection([], ""); Plotly.restyle("map", { selectedpoints: [null] }, [MAP.points]); });
$("upload-form").addEventListener("submit", upload);
drawMap().then(loadOutliers).catch((error) => message(`map: ${error.message}`));
