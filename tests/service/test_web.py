"""The web UI in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) against a
real `quantplan serve` whose database holds a finished job on the demo model.

The leaderboard's Pareto plot has one point per stored plan and a line through each job's Pareto plans; a click
on a point opens that plan; the plan's heatmap has one cell per quantized layer, coloured by its weight bits; the
download buttons give the files whose sha256 the API announces; every page reads without JavaScript, loads
nothing from another origin and labels its controls. Each page's screenshot is written to test-artifacts/web/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from quantplan.service.api import create_app
from quantplan.service.webplan import BIT_COLOURS
from quantplan.storage import load_settings
from tests.conftest import DEMO_STEPS, REPO
from tests.service.test_api import _free_port, _healthy
from tests.service.test_cli import wait_for

TOKEN = "web-test-token-0123456789"
ARTIFACTS = Path(os.environ.get("QUANTPLAN_TEST_ARTIFACTS", REPO / "test-artifacts")) / "web"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WAIT = 20  # seconds an explicit wait may take (each returns as soon as its condition holds)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_cache: Path, ray_local) -> Iterator[dict]:
    """A finished search job on the demo model in a fresh database, served by a real `quantplan serve`."""
    from quantplan.service.jobs import JobSpec
    from quantplan.service.jobs_cmd import run_local_job
    from quantplan.storage import Repository, open_store
    from quantplan.workers.demo import CALIB_SAMPLES, build_demo_model

    tmp = tmp_path_factory.mktemp("web")
    settings = load_settings(database_url=f"sqlite:///{tmp / 'web.db'}", artifacts=str(tmp / "artifacts"))
    demo = build_demo_model(demo_cache, steps=DEMO_STEPS, progress=False)  # the session's, already built
    repo = Repository(settings=settings)
    spec = JobSpec(model=str(demo.path), data=demo.calib_spec, eval_data=demo.data_spec, budget_bits=4.25,
                   trials=8, eval_top=2, samples=min(4, CALIB_SAMPLES), seq_len=128, eval_samples=4)
    job = run_local_job(repo, open_store(settings.artifacts), spec)
    repo.close()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "QUANTPLAN_DATABASE_URL": settings.database_url, "QUANTPLAN_ARTIFACTS": settings.artifacts,
           "QUANTPLAN_API_TOKENS": f"webtester={TOKEN}", "QUANTPLAN_ALLOW_HUB": "1"}  # the form submits a hub id
    proc = subprocess.Popen([sys.executable, "-m", "quantplan.service.cli", "serve", "--port", str(port),
                             "--runners", "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert wait_for(lambda: _healthy(url) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        board = httpx.get(f"{url}/v1/leaderboard", params={"model": str(demo.path), "limit": 1000}).json()
        yield {"url": url, "model": str(demo.path), "job": job.id, "plans": board["plans"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def _chrome(downloads: Path, *, javascript: bool = True) -> WebDriver:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("the browser tests need Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs "
                    "them: apt-get install chromium chromium-driver); they must not be skipped", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--hide-scrollbars", "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--force-color-profile=srgb"):
        options.add_argument(arg)
    prefs = {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    if not javascript:
        prefs["profile.managed_default_content_settings.javascript"] = 2
    options.add_experimental_option("prefs", prefs)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[WebDriver]:
    driver = _chrome(downloads)
    yield driver
    driver.quit()


def visit(driver: WebDriver, server: dict, path: str, shot: str | None = None) -> None:
    """Open a page, wait for it, check that every resource it loaded came from the server, save a screenshot."""
    driver.get(server["url"] + path)
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert_same_origin(driver, server["url"])
    if shot is not None:
        screenshot(driver, shot)


def assert_same_origin(driver: WebDriver, origin: str) -> None:
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [u for u in loaded if not u.startswith(origin + "/")]
    assert not outside, f"requests left the server's origin: {outside}"
    assert driver.execute_script("return location.origin") == origin


def screenshot(driver: WebDriver, name: str) -> Path:
    """The whole page (beyond the window, through the DevTools protocol) as a PNG in test-artifacts/web/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": clip})
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def board_path(server: dict, **query: str) -> str:
    extra = "".join(f"&{k}={quote(v)}" for k, v in query.items())
    return f"/leaderboard?model={quote(server['model'])}{extra}"


def scheme_of(entry) -> str:
    return entry["scheme"] if isinstance(entry, dict) else entry


def rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, 1)"  # as Chromium reports a computed colour


# ---------------------------------------------------------------------------------------------- pages


def test_models_page_lists_the_demo_model(browser: WebDriver, server: dict) -> None:
    visit(browser, server, "/", "models")
    rows = browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    assert len(rows) == 1 and server["model"] in rows[0].text
    cells = [c.text for c in rows[0].find_elements(By.CSS_SELECTOR, "td")]
    assert cells[1:] == [str(len(server["plans"])), "1"]  # plans, jobs
    assert float(cells[0]) > 0  # the unquantized perplexity, measured when the best plan was materialized


def test_pareto_plot_has_a_point_per_plan_and_the_front_through_the_pareto_plans(browser: WebDriver,
                                                                                   server: dict) -> None:
    visit(browser, server, board_path(server), "leaderboard")
    points = browser.find_elements(By.CSS_SELECTOR, "svg#pareto a.point")
    by_id = {int(p.get_attribute("data-plan-id")): p for p in points}
    assert len(points) == len(by_id) == len(server["plans"]) >= 4
    assert set(by_id) == {p["id"] for p in server["plans"]}
    for plan in server["plans"]:  # the marker says whether the plan is on the front; the hover title names it
        point = by_id[plan["id"]]
        assert point.get_attribute("data-pareto") == ("1" if plan["is_pareto"] else "0")
        assert f"plan {plan['id']}" in point.find_element(By.TAG_NAME, "title").get_attribute("textContent")
    pareto = [p for p in server["plans"] if p["is_pareto"]]
    [front] = browser.find_elements(By.CSS_SELECTOR, "svg#pareto polyline.front")  # one job: one front
    vertices = [tuple(map(float, v.split(","))) for v in front.get_attribute("points").split()]
    expected = [(float(by_id[p["id"]].get_attribute("data-px")), float(by_id[p["id"]].get_attribute("data-py")))
                for p in pareto]
    assert len(pareto) >= 2 and sorted(vertices) == sorted(expected)  # through every Pareto plan, nothing else
    assert [v[0] for v in vertices] == sorted(v[0] for v in vertices)  # in order of the x axis
    assert browser.find_elements(By.CSS_SELECTOR, "svg#pareto line.fp")  # the unquantized model's line
    kinds = {p.get_attribute("data-kind") for p in points}
    assert {"searched", "uniform"} <= kinds  # the fixed recipes have markers of their own
    rows = browser.find_elements(By.CSS_SELECTOR, "#plans tbody tr")  # the plot's table equivalent
    assert sorted(int(r.get_attribute("data-plan-id")) for r in rows) == sorted(by_id)


def test_clicking_a_point_opens_its_plan(browser: WebDriver, server: dict) -> None:
    visit(browser, server, board_path(server))
    # a point drawn on top at its own centre (two plans may share a position; the other one is hidden below)
    plan_id = browser.execute_script("""
        for (const a of document.querySelectorAll('svg#pareto a.point')) {
          const r = a.querySelector('circle, rect, polygon').getBoundingClientRect();
          const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
          if (hit && hit.closest('a.point') === a) return Number(a.dataset.planId);
        }
        return null;""")
    assert plan_id is not None
    marker = browser.find_element(By.CSS_SELECTOR, f'a.point[data-plan-id="{plan_id}"] :is(circle, rect, polygon)')
    ActionChains(browser).move_to_element(marker).perform()  # hovering lights up the plan's table row
    WebDriverWait(browser, WAIT).until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'#plans tr.hot[data-plan-id="{plan_id}"]')))
    marker.click()
    WebDriverWait(browser, WAIT).until(ec.url_matches(rf"/plans/{plan_id}$"))
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith(f"Plan {plan_id}")


def test_plot_axes_switch_and_the_table_sorts_and_filters(browser: WebDriver, server: dict) -> None:
    visit(browser, server, board_path(server))
    browser.find_element(By.ID, "y").send_keys("KL")  # the script submits the form on change
    WebDriverWait(browser, WAIT).until(ec.url_contains("y=kl"))
    browser.find_element(By.ID, "log").click()
    WebDriverWait(browser, WAIT).until(ec.url_contains("log=1"))
    svg = browser.find_element(By.ID, "pareto")
    assert (svg.get_attribute("data-y"), svg.get_attribute("data-log")) == ("kl", "1")
    assert "log scale" in browser.find_element(By.CSS_SELECTOR, "svg#pareto title").get_attribute("textContent")
    positive = [p for p in server["plans"] if (p["kl"] or 0) > 0]
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg#pareto a.point")) == len(positive)
    screenshot(browser, "leaderboard-kl-log")

    visit(browser, server, board_path(server, sort="avg_bits", order="desc"))
    bits = [float(r.find_elements(By.TAG_NAME, "td")[4].text) for r in
            browser.find_elements(By.CSS_SELECTOR, "#plans tbody tr")]
    assert bits == sorted(bits, reverse=True)
    browser.find_element(By.CSS_SELECTOR, "#plans th[aria-sort] a").click()  # the same column, ascending
    WebDriverWait(browser, WAIT).until(ec.url_contains("order=asc"))
    visit(browser, server, board_path(server, act_bits="16"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#plans tbody tr")
    acts = {r.find_elements(By.TAG_NAME, "td")[6].text for r in rows}
    assert acts == {"16"}
    for fmt in ("quantplan", "compressed-tensors"):  # the target format: plans whose schemes it expresses
        visit(browser, server, board_path(server, format=fmt))
        rows = browser.find_elements(By.CSS_SELECTOR, "#plans tbody tr[data-plan-id]")
        shown = {int(r.get_attribute("data-plan-id")) for r in rows}
        assert shown == {p["id"] for p in server["plans"] if fmt in p["formats"]}


def test_heatmap_has_a_cell_per_quantized_layer_coloured_by_its_bits(browser: WebDriver, server: dict) -> None:
    for n, summary in enumerate(sorted(server["plans"], key=lambda p: not p["artifacts"])[:3]):
        plan = httpx.get(f"{server['url']}/v1/plans/{summary['id']}").json()["plan"]
        layers = {name: scheme_of(e) for name, e in plan["layers"].items()}  # the layers it quantizes; default: rest
        visit(browser, server, f"/plans/{summary['id']}", "plan" if n == 0 else None)
        cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")
        assert len(cells) == len(layers) > 0
        for cell in cells:
            layer = cell.get_attribute("data-layer")
            bits = int(re.match(r"w(\d+)", layers[layer])[1])
            assert cell.get_attribute("data-scheme") == layers[layer]
            assert cell.value_of_css_property("background-color") == rgb(BIT_COLOURS[bits][0])
            assert cell.text.startswith(str(bits))
        blocks = browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")
        assert len(blocks) == 4  # the demo model's decoder blocks; columns q, k, v, o, gate, up, down
        assert [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#heatmap thead th")][1:] == \
            ["q", "k", "v", "o", "gate", "up", "down"]


def test_download_buttons_give_the_files_the_api_announces(browser: WebDriver, server: dict,
                                                           downloads: Path) -> None:
    [packed] = [p for p in server["plans"] if p["artifacts"]]
    visit(browser, server, f"/plans/{packed['id']}")
    buttons = browser.find_elements(By.CSS_SELECTOR, "a.download")
    assert "quantplan" in [b.get_attribute("data-format") for b in buttons]  # the stored artifact's format
    with httpx.stream("GET", f"{server['url']}/v1/plans/{packed['id']}/artifact") as r:
        announced = r.headers["X-Content-SHA256"]
    for button in buttons:
        if button.get_attribute("data-format") != "quantplan":
            continue
        button.click()
        path = downloaded(browser, downloads / f"plan-{packed['id']}-quantplan.tar")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == announced == packed["artifacts"][0]["sha256"]
    browser.find_element(By.ID, "download-plan-json").click()
    plan_json = downloaded(browser, downloads / f"plan-{packed['id']}.json")
    assert json.loads(plan_json.read_text()) == httpx.get(f"{server['url']}/v1/plans/{packed['id']}/plan.json").json()
    commands = browser.find_element(By.ID, "cmd-download").text
    assert commands == f"quantplan download {packed['id']} -o ./plan-{packed['id']} --server {server['url']}"
    assert browser.find_element(By.ID, "cmd-apply").text.endswith(f"--model {server['model']}")


def downloaded(driver: WebDriver, path: Path) -> Path:
    """`path` once the browser has finished writing it."""
    WebDriverWait(driver, WAIT).until(lambda _: path.is_file() and not list(path.parent.glob("*.crdownload")))
    return path


def test_jobs_pages_and_the_submit_form_for_token_holders(browser: WebDriver, server: dict) -> None:
    visit(browser, server, "/jobs", "jobs")
    row = browser.find_element(By.CSS_SELECTOR, f'#jobs tr[data-job-id="{server["job"]}"]')
    assert row.get_attribute("data-status") == "succeeded" and "materialize" in row.text
    assert not browser.find_elements(By.ID, "submit")  # anonymous: no submit form
    assert httpx.post(f"{server['url']}/jobs", data={"model": "m", "data": "wikitext2"}).status_code == 401
    visit(browser, server, f"/jobs/{server['job']}", "job")
    assert browser.find_elements(By.CSS_SELECTOR, "#job-plans tbody tr a")
    spec = browser.find_element(By.ID, "spec").text  # anonymous readers: no paths of the spec (service.access)
    assert "budget_bits" in spec and server["model"] not in spec and "data" not in spec.split()

    visit(browser, server, "/login?next=/jobs")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    WebDriverWait(browser, WAIT).until(ec.presence_of_element_located((By.ID, "submit")))
    assert "webtester" in browser.find_element(By.TAG_NAME, "header").text
    assert_labelled(browser)
    screenshot(browser, "jobs-signed-in")
    browser.find_element(By.ID, "f-model").send_keys("org/some-model")
    browser.find_element(By.ID, "f-data").send_keys("wikitext2")
    browser.find_element(By.ID, "f-budget-bits").send_keys("4.25")
    browser.find_element(By.CSS_SELECTOR, "form#submit button").click()
    WebDriverWait(browser, WAIT).until(ec.url_matches(r"/jobs/\d+$"))
    job_id = int(browser.current_url.rsplit("/", 1)[1])
    stored = httpx.get(f"{server['url']}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert stored["submitter"] == "webtester" and stored["spec"]["model"] == "org/some-model"
    assert browser.find_elements(By.ID, "refreshing")  # queued (no runner here): the page refreshes itself
    assert browser.find_element(By.CSS_SELECTOR, "meta[http-equiv=refresh]")
    assert "webtester" in browser.find_element(By.ID, "job").text  # the submitter sees their own job whole
    browser.find_element(By.ID, "cancel").click()
    WebDriverWait(browser, WAIT).until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "cancelled"))
    browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    WebDriverWait(browser, WAIT).until(ec.presence_of_element_located((By.LINK_TEXT, "Sign in")))


def assert_labelled(driver: WebDriver) -> None:
    """Every visible form control has a label (label[for], a wrapping label, aria-label) or text of its own."""
    unlabelled = driver.execute_script("""
        return [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')].filter(el =>
          !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim()
        ).map(el => el.outerHTML)""")
    assert unlabelled == []


def test_every_control_is_labelled_and_every_plot_has_a_table(browser: WebDriver, server: dict) -> None:
    plan_id = server["plans"][0]["id"]
    for path in ("/", board_path(server), f"/plans/{plan_id}", "/jobs", f"/jobs/{server['job']}", "/login"):
        visit(browser, server, path)
        assert_labelled(browser)
        for svg in browser.find_elements(By.CSS_SELECTOR, "main svg"):
            assert svg.get_attribute("role") == "img" and svg.find_element(By.TAG_NAME, "title")
            assert browser.find_elements(By.CSS_SELECTOR, "table#plans tbody tr")  # the plot's table equivalent


def test_pages_read_without_javascript(server: dict, tmp_path: Path) -> None:
    driver = _chrome(tmp_path, javascript=False)
    try:
        visit(driver, server, board_path(server), "leaderboard-no-js")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#plans tbody tr")) == len(server["plans"])
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg#pareto a.point")) == len(server["plans"])
        driver.find_element(By.ID, "pareto_only").click()
        driver.find_element(By.ID, "apply").click()  # without the script, the Apply button submits the filters
        WebDriverWait(driver, WAIT).until(ec.url_contains("pareto_only=1"))
        pareto = [p for p in server["plans"] if p["is_pareto"]]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#plans tbody tr")) == len(pareto)
        visit(driver, server, f"/plans/{server['plans'][0]['id']}")
        assert driver.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")
        visit(driver, server, "/jobs")
        assert driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr[data-job-id]")
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------- no browser


def test_reads_need_a_token_when_the_server_says_so(tmp_path: Path) -> None:
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'q.db'}", artifacts=str(tmp_path / "a"),
                             api_tokens=f"alice={TOKEN}", auth_reads=True)
    with TestClient(create_app(settings)) as c:
        for path in ("/", "/jobs", "/plans/1", "/leaderboard?model=x"):
            r = c.get(path, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert c.get("/plans/1/plan.json").status_code == 401
        assert c.post("/login", data={"token": "wrong-token-123", "next": "/"}).status_code == 401
        r = c.post("/login", data={"token": TOKEN, "next": "//evil.example/"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"  # only local redirect targets
        assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        assert c.get("/").status_code == 200  # the cookie now holds the token
        assert "No plans are stored yet" in c.get("/").text
        assert c.get("/static/quantplan.js").status_code == 200


def test_heatmap_colours_read_in_greyscale() -> None:
    """The lightness of the weight-bit colours rises strictly with the bits (distinct in greyscale)."""
    def luminance(hex_colour: str) -> float:
        r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    lum = [luminance(BIT_COLOURS[b][0]) for b in sorted(BIT_COLOURS)]
    assert all(b - a > 0.08 for a, b in zip(lum, lum[1:], strict=False)), lum


def test_server_render_time_is_reported(server: dict) -> None:
    start = time.perf_counter()
    r = httpx.get(server["url"] + board_path(server))
    assert r.status_code == 200 and time.perf_counter() - start < 5
    assert re.fullmatch(r"render;dur=[\d.]+", r.headers["server-timing"])


def test_the_submit_form_confines_and_cancel_is_for_the_submitter_or_an_admin(tmp_path: Path) -> None:
    tokens = {"alice": "alice-token-0123", "bob": "bob-token-0123456", "root": "root-token-012345"}
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'q.db'}", artifacts=str(tmp_path / "a"),
                             api_tokens=f"alice={tokens['alice']},bob={tokens['bob']},root={tokens['root']}:admin")
    with TestClient(create_app(settings)) as c:
        def sign_in(name: str) -> None:
            assert c.post("/login", data={"token": tokens[name]}, follow_redirects=False).status_code == 303

        sign_in("alice")
        form = {"model": "org/some-model", "data": "wikitext2", "budget_bits": "4.25"}
        r = c.post("/jobs", data=form)  # the hub is off on this server: refused as the API refuses it
        assert r.status_code == 422 and "QUANTPLAN_ALLOW_HUB" in r.text
        (tmp_path / "m").mkdir()
        r = c.post("/jobs", data={**form, "model": str(tmp_path / "m")})  # no model roots: refused as well
        assert r.status_code == 422 and c.get("/v1/jobs").json() == []
        job_id = c.app.state.services.repo.create_job({"model": "org/m"}, submitter="alice").id  # alice's job
        sign_in("bob")
        assert 'id="cancel"' not in c.get(f"/jobs/{job_id}").text
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 403
        sign_in("root")  # an admin may cancel any job
        assert c.post(f"/jobs/{job_id}/cancel", follow_redirects=False).status_code == 303
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
