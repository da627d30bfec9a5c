"""The explorer in a real browser: headless Chromium from the system's packages, driven by Selenium.

Skips where /usr/bin/chromium or /usr/bin/chromedriver is absent (`make test` installs both through
.ci/system-packages). The driver path is given explicitly, so Selenium Manager never downloads one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from xmm_pipeline.latent.evaluate import ONE_ES_IAUNAME
from xmm_pipeline_tests.conftest import skip_unless_ci
from xmm_pipeline_tests.explore.conftest import archive_product, archive_rmf

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1500,1100")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        skip_unless_ci(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} "
                    "(Debian packages chromium, chromium-driver; `make test` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(condition, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _click_at(driver, x: float, y: float) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(round(x), round(y))
    actions.w3c_actions.pointer_action.pause(0.3)
    actions.w3c_actions.pointer_action.click()
    actions.perform()


def _requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _shown_detid(driver) -> str:
    return driver.find_element("id", "detection-title").get_attribute("data-detid") or ""


def test_search_pick_click_and_export_in_chromium(browser, explorer_url: str, explorer_data) -> None:
    driver, data = browser, explorer_data
    driver.get(explorer_url + "/")
    _wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), what="the map")

    # Search an IAU name: the spectrum and neighbour panels show that detection.
    first = data.search(ONE_ES_IAUNAME)[0]
    driver.find_element("id", "search-input").send_keys(ONE_ES_IAUNAME)
    driver.find_element("id", "search-button").click()
    _wait(lambda: _shown_detid(driver) == str(first["detid"]), what="the searched detection")
    assert ONE_ES_IAUNAME in driver.find_element("id", "detection-title").text
    title = _wait(lambda: driver.execute_script(
        "const t = document.querySelector('#spectrum .gtitle'); return t && t.textContent;"), what="spectrum")
    assert f"detid {first['detid']}" in title and "deviance/dof" in title
    assert driver.execute_script("return document.getElementById('spectrum').data.length") == 4
    expected = [str(n["detid"]) for n in data.detection(first["row"], k=10)["neighbours"]]
    rows = driver.find_elements("css selector", "#neighbours tr.pick")
    shown = [r.get_attribute("data-detid") for r in rows]
    assert shown == expected
    assert driver.execute_script("return document.getElementById('overlay').data.length") == 11

    # The source's trajectory: its detections in time order on the map, and a spectrum per epoch.
    path = data.trajectory(first["srcid"])
    driver.find_element("id", "trajectory-button").click()
    _wait(lambda: driver.execute_script("const t = document.getElementById('trajectory-spectra').data;"
                                        "return t && t.length"), what="the spectra per epoch")
    drawn = driver.execute_script("const t = document.getElementById('map').data[4];"
                                  "return {rows: Array.from(t.customdata), n: t.x.length,"
                                  " epochs: document.getElementById('trajectory-spectra').data.length};")
    assert drawn == {"rows": path["rows"], "n": len(path["rows"]), "epochs": len(path["rows"])}

    # Click a point: the most isolated detection on the map, so the cursor can hit nothing else.
    gaps = np.linalg.norm(data.xy[:, None, :] - data.xy[None, :, :], axis=2)
    np.fill_diagonal(gaps, np.inf)
    row = int(np.argmax(gaps.min(axis=1)))
    position = driver.execute_script(f"return window.explorer.pagePosition({row})")
    _click_at(driver, position["x"], position["y"])
    _wait(lambda: _shown_detid(driver) == str(data.detids[row]), what=f"the clicked detection (row {row})")
    neighbour_rows = [int(r.get_attribute("data-row"))
                      for r in driver.find_elements("css selector", "#neighbours tr.pick")]
    assert len(neighbour_rows) == 10

    # Export the current selection (the picked detection and its neighbours) as a VOTable.
    driver.find_element("css selector", "#export-format option[value='votable']").click()
    driver.find_element("id", "export-button").click()
    name = _wait(lambda: driver.execute_script("return document.body.dataset.exported"), what="the export")
    path = driver.downloads / name
    _wait(lambda: path.is_file() and path.stat().st_size > 0, what=f"the download {path}")
    table = Table.read(path, format="votable")
    assert list(table["detid"]) == [int(data.detids[r]) for r in [row, *neighbour_rows]]
    assert str(table["ra"].unit) == "deg"

    # Nothing the page asked for left this machine's server.
    urls = _requested_urls(driver)
    assert any(u.endswith("/vendor/plotly.min.js") for u in urls)
    network = [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:", "ftp:"))]
    outside = [u for u in network if not u.startswith(explorer_url + "/")]
    assert outside == []


def test_box_selection_and_outlier_list(browser, explorer_url: str, explorer_data) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    driver, data = browser, explorer_data
    driver.get(explorer_url + "/")
    _wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), what="the map")
    _wait(lambda: driver.find_elements("css selector", "#outliers tr.pick"), what="the outlier list")
    top = driver.find_elements("css selector", "#outliers tr.pick")[0]
    top.click()
    _wait(lambda: _shown_detid(driver) == top.get_attribute("data-detid"), what="the top outlier")

    driver.execute_script("Plotly.relayout('map', {dragmode: 'select'})")
    box = driver.execute_script("""
        const gd = document.getElementById('map'), full = gd._fullLayout, r = gd.getBoundingClientRect();
        return {left: r.left + full._size.l, top: r.top + full._size.t, w: full._size.w, h: full._size.h};""")
    x0, y0 = box["left"] + 0.2 * box["w"], box["top"] + 0.2 * box["h"]
    x1, y1 = box["left"] + 0.7 * box["w"], box["top"] + 0.8 * box["h"]
    actions = ActionChains(driver)
    pointer = actions.w3c_actions.pointer_action
    pointer.move_to_location(int(x0), int(y0))
    pointer.pointer_down()
    for f in (0.25, 0.5, 0.75, 1.0):
        pointer.move_to_location(int(x0 + f * (x1 - x0)), int(y0 + f * (y1 - y0)))
    pointer.pointer_up()
    actions.perform()
    _wait(lambda: driver.execute_script("return window.explorer.state.selectionSource === 'lasso'"),
          what="the box selection")
    selected = set(driver.execute_script("return window.explorer.state.selection"))
    corners = driver.execute_script(f"""
        const full = document.getElementById('map')._fullLayout;
        return [full.xaxis.p2l({int(x0) - box['left']}), full.xaxis.p2l({int(x1) - box['left']}),
                full.yaxis.p2l({int(y1) - box['top']}), full.yaxis.p2l({int(y0) - box['top']})];""")
    xa, xb, ya, yb = corners
    margin = 0.01 * max(xb - xa, yb - ya)
    x, y = data.xy[:, 0], data.xy[:, 1]
    inner = set(np.flatnonzero((x > xa + margin) & (x < xb - margin) & (y > ya + margin) & (y < yb - margin)))
    outer = set(np.flatnonzero((x > xa - margin) & (x < xb + margin) & (y > ya - margin) & (y < yb + margin)))
    assert inner and inner <= selected <= outer
    assert f"{len(selected)} detections" in driver.find_element("id", "selection-count").text


def test_a_spectrum_file_uploaded_from_the_page(browser, explorer_url: str, explorer_data,
                                                 sim_archive: Path) -> None:
    driver, data = browser, explorer_data
    record = data.embeddings.iloc[len(data.detids) // 4]
    spectrum = archive_product(sim_archive, record["obs_id"], int(record["src_num"]), "SRSPEC")
    driver.get(explorer_url + "/")
    _wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), what="the map")
    driver.find_element("id", "upload-spectrum").send_keys(str(spectrum))
    rmf = archive_rmf(sim_archive, spectrum)
    driver.find_element("css selector", "input[name='rmf']").send_keys(str(rmf))
    for field, kind in (("background", "BGSPEC"), ("arf", "SRCARF")):
        product = archive_product(sim_archive, record["obs_id"], int(record["src_num"]), kind)
        driver.find_element("css selector", f"input[name='{field}']").send_keys(str(product))
    driver.find_element("id", "upload-button").click()
    _wait(lambda: "placed at" in driver.find_element("id", "detection-title").text, what="the placement")
    first = driver.find_elements("css selector", "#neighbours tr.pick")[0]
    assert first.get_attribute("data-detid") == str(record["detid"])
    assert spectrum.name in driver.find_element("id", "detection-title").text
    assert driver.execute_script("return document.getElementById('map').data[5].x.length") == 1
