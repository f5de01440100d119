"""The Airflow UI in a real browser: headless Chromium (Debian's chromium + chromium-driver,
installed by `make setup`) driven by selenium, against `make airflow`'s own script
(scripts/airflow-standalone.sh: airflow standalone) on free ports with the emulators.

It signs in through the login form, triggers a run with a good batch and an EMPTY batch, and
checks what the pages show: labelled mapped tasks, the EMPTY batch set apart, the batches view
with both batches, their states and counts, and where the extra links lead. Screenshots go to the
test's temporary folder; a failure message lists them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from tests import airflow_api as api
from tests.conftest import PROJECT, REPO_ROOT
from tools import emulators
from tools.landing_zone import BatchSpec, ImageSpec, demo_batches, write_batch

pytestmark = pytest.mark.e2e

DAG_ID = "dicom_storage"
PASSWORD = "browser-password"
COLLECTION = "IRB_browser"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _copy_metadata_db(source: Path, home: Path) -> None:
    """This session's migrated database, with the local pools, as the new home's: `airflow db
    migrate` costs more than a minute on a busy 2-core machine, and the script skips it then."""
    import sqlite3

    from airflow.models.pool import Pool

    # One archive task at a time: two mapped tasks that emit the first event of the same new asset
    # at the same moment can collide in Airflow's asset creation (a unique-key error fails one).
    for pool, slots in (("dicom_storage_gcs", 1), ("dicom_storage_bigquery", 2)):
        Pool.create_or_update_pool(pool, slots, "browser test", include_deferred=False)
    with sqlite3.connect(source / "airflow.db") as src, sqlite3.connect(home / "airflow.db") as dst:
        src.backup(dst)
        # The earlier tests left their DAGs' next scheduled run in the copy: the new scheduler would
        # start it (hourly, from the old parse) before the DAG is parsed again with DICOM_SCHEDULE=none,
        # and that run would race the test's own for the same batches.
        dst.execute(
            "UPDATE dag SET next_dagrun = NULL, next_dagrun_data_interval_start = NULL,"
            " next_dagrun_data_interval_end = NULL, next_dagrun_create_after = NULL"
        )


@pytest.fixture(scope="module")
def ui(tmp_path_factory, gcs_emulator, bigquery_emulator, airflow_db) -> Iterator[dict]:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromedriver are missing: `make setup` installs them (scripts/setup.sh)")
    home = tmp_path_factory.mktemp("ui-home")
    _copy_metadata_db(airflow_db, home)
    landing = tmp_path_factory.mktemp("ui-landing")
    bucket = "ui-archive"
    GCSHook().create_bucket(bucket_name=bucket, project_id=PROJECT)
    # A collection of its own: the BigQuery emulator is shared by the whole test session, and
    # other modules count the rows of the demo's collection.
    good = dataclasses.replace(demo_batches(days=1, start=date(2024, 3, 1))[0], collection=COLLECTION)
    named = ImageSpec("GLee0009", "GLff0009", "20230106", "CT", source="ct", header_overrides={"PatientName": "X^Y"})
    empty = BatchSpec(
        "20240302-0001", images=[named], collection=COLLECTION, completed_at=datetime(2024, 3, 2, tzinfo=UTC)
    )
    for batch in (good, empty):
        write_batch(landing, batch)

    port, worker_log_port, trigger_log_port = emulators.free_port(), emulators.free_port(), emulators.free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW_PORT": str(port),
        "AIRFLOW_WORKER_LOG_PORT": str(worker_log_port),
        "AIRFLOW_TRIGGER_LOG_PORT": str(trigger_log_port),
        "AIRFLOW_ADMIN_PASSWORD": PASSWORD,
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "SEND_TO_GOOGLE": "true",
        "GOOGLE_CLOUD_STORAGE": bucket,
        "GOOGLE_PROJECT_NAME": PROJECT,
        "DICOM_LANDING_ROOT": str(landing),
        "DICOM_LOCAL_OUTPUT": str(home / "output"),
        "DICOM_STUDIES_PER_TASK": "2",
        "DICOM_TASK_RETRIES": "1",  # SQLite under three busy components: a rare lock is retried
        # Manual runs only: an unpaused hourly DAG would also start a scheduled run at once, racing
        # the test's run for the same two batches.
        "DICOM_SCHEDULE": "none",
    }
    log_path = home / "standalone.log"
    log = open(log_path, "wb")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(
        ["bash", str(REPO_ROOT / "scripts" / "airflow-standalone.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        api.wait("a healthy airflow standalone", lambda: api.healthy(base), 300, proc, log_path)
        token = api.request(base, "POST", "/auth/token", body={"username": "admin", "password": PASSWORD})
        yield {
            "base": base,
            "token": token["access_token"],
            "good": good,
            "empty": empty,
            "home": home,
            "landing": landing,
            "log": log_path,
            "proc": proc,
            "log_ports": (worker_log_port, trigger_log_port),
        }
    finally:
        emulators.stop(proc.pid, timeout=30)
        log.close()


@pytest.fixture(scope="module")
def finished_run(ui) -> dict:
    base, token = ui["base"], ui["token"]
    api.wait("dicom_storage parsed", lambda: api.request(base, "GET", f"/api/v2/dags/{DAG_ID}", token), 120, ui["proc"])
    run = api.trigger_run(
        base, token, DAG_ID, "manual__browser_ui", {"batch_ids": [ui["good"].batch_id, ui["empty"].batch_id]}
    )

    def done() -> dict | None:
        found = api.request(base, "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}", token)
        return found if found["state"] in ("success", "failed") else None

    return api.wait("the run to finish (the DAG starts unpaused)", done, 300, ui["proc"], ui["log"])


@pytest.fixture(scope="module")
def browser(ui, tmp_path_factory) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The browser plus its screenshots; `check` fails with the screenshot paths attached."""

    def __init__(self, driver, base: str, folder: Path) -> None:
        self.driver, self.base, self.folder = driver, base, folder
        self.shots: list[Path] = []

    def open(self, path: str) -> None:
        self.driver.get(f"{self.base}{path}")

    def shot(self, name: str) -> Path:
        path = self.folder / f"{len(self.shots):02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.shots.append(path)
        return path

    def text(self) -> str:
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        # React may replace the body between finding it and reading it, and while the browser
        # navigates (after the login form's submit) there is briefly no body at all.
        for _ in range(20):
            try:
                return self.driver.find_element("tag name", "body").text
            except (StaleElementReferenceException, NoSuchElementException):
                time.sleep(0.25)
        return ""

    def wait_text(self, *needles: str, timeout: float = 45) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        self.shot("missing-text")
        raise AssertionError(f"the page never showed {needles}; screenshots: {[str(s) for s in self.shots]}\n{text}")

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.shot("failed-check")
            raise AssertionError(f"{message}; screenshots: {[str(s) for s in self.shots]}")


@pytest.fixture(scope="module")
def page(browser, ui, tmp_path_factory) -> Page:
    """Signed in through the login form, as a user does (no token cookie set by hand)."""
    page = Page(browser, ui["base"], tmp_path_factory.mktemp("screenshots"))
    page.open("/")
    page.wait_text("Sign in")
    browser.find_element("css selector", "input[name=username]").send_keys("admin")
    browser.find_element("css selector", "input[name=password]").send_keys(PASSWORD)
    page.shot("login")
    browser.find_element("css selector", "button[type=submit]").click()
    api.wait("the signed-in home page", lambda: "Sign in" not in page.text() and "Dags" in page.text(), 60)
    page.shot("home")
    return page


def test_the_batches_view_refuses_an_unauthenticated_request(ui):
    base = ui["base"]
    for path in ("/dicom-batches/", "/dicom-batches/api/batches", f"/dicom-batches/report/{ui['good'].batch_id}"):
        assert api.status(base, path) in (401, 403), path
    assert api.status(base, "/dicom-batches/api/batches", ui["token"]) == 200
    assert api.status(base, "/dicom-batches/api/batches", "not-a-token") in (401, 403)


def test_only_the_api_server_listens_and_only_on_loopback(ui):
    import socket

    for port in ui["log_ports"]:  # the scheduler and the triggerer start without a log server
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something listens on log-server port {port}"
    api_port = int(ui["base"].rsplit(":", 1)[1])
    listening = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    ours = [fields[1] for fields in listening if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == api_port]
    assert ours == [f"0100007F:{api_port:04X}"], "the API server listens on 127.0.0.1 only"


def _good_figures(ui) -> dict[str, int]:
    """What the page must show of the good batch: the figures of its own report (the demo batch's
    content changes as the demo grows; the UI must agree with the report, whatever it holds)."""
    report = json.loads((ui["landing"] / ui["good"].batch_id / "batch.report.json").read_text())
    return {
        "seen": report["images"]["seen"],
        "archived": report["images"]["archived"],
        "quarantined": report["images"]["quarantined"],
        "written": report["archives"]["written"],
        "rows": report["bigquery"]["rows_inserted"],
    }


def _good_label(ui) -> str:
    f = _good_figures(ui)
    return (
        f"{ui['good'].batch_id}: DONE, {f['quarantined']} of {f['seen']} quarantined, "
        f"{f['written']} archives written, {f['rows']} new rows"
    )


def test_run_outcomes_through_the_rest_api(ui, finished_run):
    base, token, run_id = ui["base"], ui["token"], finished_run["dag_run_id"]
    good, empty = ui["good"].batch_id, ui["empty"].batch_id
    assert finished_run["state"] == "success", api.failed_try_logs(Path(ui["home"]), DAG_ID, run_id)
    tis = api.request(base, "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100", token)
    by_task: dict[str, dict[str, str]] = {}
    for ti in tis["task_instances"]:
        by_task.setdefault(ti["task_id"], {})[ti["rendered_map_index"] or str(ti["map_index"])] = ti["state"]
    assert by_task["archive_studies"] == {f"{good} studies 1-2": "success", f"{good} studies 3-4": "success"}
    assert by_task["load_metadata"] == {good: "success", empty: "success"}
    reports = {label.split(":")[0]: (label, state) for label, state in by_task["batch_report"].items()}
    assert reports[empty] == (f"{empty}: EMPTY, 1 of 1 quarantined", "skipped")
    assert reports[good][1] == "success"
    assert _good_figures(ui)["quarantined"] > 0, "the demo batch holds quarantined images"
    assert _good_figures(ui)["rows"] > 0, "and archived ones"
    assert reports[good][0].startswith(_good_label(ui))
    assert (finished_run["note"] or "").startswith("⚠ **2 batches**: 1 DONE, 1 EMPTY;"), "the run's note"

    links = api.request(
        base, "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/load_metadata/links?map_index=0", token
    )["extra_links"]
    assert links["Batch report"] == f"/dicom-batches/report/{good}"
    assert links["Archives in Cloud Storage"] == f"/dicom-batches/objects/{good}"
    assert links["Metadata table in BigQuery"] == f"/dicom-batches/?collection={COLLECTION}"


def test_the_grid_shows_labels_and_the_empty_batch_apart(page, ui, finished_run):
    run = urllib.parse.quote(finished_run["dag_run_id"], safe="")
    good, empty = ui["good"].batch_id, ui["empty"].batch_id
    # The run page: its note, and every task instance with its label and state.
    page.open(f"/dags/{DAG_ID}/runs/{run}")
    text = page.wait_text(
        "⚠ 2 batches: 1 DONE, 1 EMPTY",
        f"{empty}: EMPTY, 1 of 1 quarantined\nSkipped",
        f"{_good_label(ui)}\nSuccess",
        f"{good} studies 1-2",
        f"{good} studies 3-4",
        "DICOM batches",  # the plugin's tab on the run
    )
    page.shot("run")
    page.check(f"load_metadata\n{empty}\nSuccess" in text, "load_metadata instances carry the batch id")
    # batch_report's mapped instances: the EMPTY batch counted apart.
    page.open(f"/dags/{DAG_ID}/runs/{run}/tasks/batch_report/mapped")
    page.wait_text("Total Skipped\n1", "Total Success\n1")
    page.shot("batch-report-instances")


def test_the_batches_view_lists_both_batches(page, ui, finished_run):
    good, empty = ui["good"].batch_id, ui["empty"].batch_id
    page.open("/plugin/dicom-batches")
    try:
        frames = api.wait("the view inside the Airflow UI", lambda: page.driver.find_elements("tag name", "iframe"), 45)
    except TimeoutError:
        page.check(False, "the view is shown inside the Airflow UI (an iframe under the navigation)")
    page.driver.switch_to.frame(frames[0])
    try:
        text = page.wait_text("DICOM batches", good, empty, "DONE", "EMPTY")
        rows = {row.get_attribute("data-batch"): row for row in page.driver.find_elements("css selector", "tr.batch")}
        page.check({good, empty} <= set(rows), f"both batches are listed: {sorted(rows)}")
        good_cells = [c.text for c in rows[good].find_elements("tag name", "td")]
        empty_cells = [c.text for c in rows[empty].find_elements("tag name", "td")]
        page.check(good_cells[1].startswith("DONE"), str(good_cells))
        figures = _good_figures(ui)
        seen_archived = [str(figures["seen"]), str(figures["archived"])]
        page.check(good_cells[4:6] == seen_archived, f"images seen, archived {seen_archived} in {good_cells}")
        page.check(good_cells[6].startswith(str(figures["quarantined"])), f"quarantined in {good_cells}")
        page.check(good_cells[8] == str(figures["rows"]), f"{figures['rows']} rows inserted in {good_cells}")
        page.check(empty_cells[1].startswith("EMPTY"), str(empty_cells))
        page.check(empty_cells[4:6] == ["1", "0"], f"1 image seen, 0 archived in {empty_cells}")
        page.check("attention" in (rows[empty].get_attribute("class") or ""), "the EMPTY batch is marked")
        page.check("GLee0009" not in text and "X^Y" not in text, "no patient id or header value")
        report_link = rows[good].find_element("link text", "report").get_attribute("href")
        page.check(report_link.endswith(f"/dicom-batches/report/{good}"), report_link)
    finally:
        page.driver.switch_to.default_content()
    page.shot("batches-view")
    frames[0].screenshot(str(page.folder / "batches-view-frame.png"))  # the README's picture


def test_the_extra_link_opens_the_report_in_the_batches_view(page, ui, finished_run):
    good = ui["good"].batch_id
    run = urllib.parse.quote(finished_run["dag_run_id"], safe="")
    page.open(f"/dags/{DAG_ID}/runs/{run}/tasks/load_metadata/mapped/0/details")
    page.wait_text("Extra Links", "Batch report")
    anchors = [a for a in page.driver.find_elements("tag name", "a") if a.text.strip() == "Batch report"]
    page.shot("task-instance-links")
    page.check(bool(anchors), "the task page shows the 'Batch report' link")
    href = anchors[0].get_attribute("href")
    page.check(href == f"{ui['base']}/dicom-batches/report/{good}", href)
    page.open(f"/dicom-batches/report/{good}")
    report = json.loads(page.driver.find_element("tag name", "body").text)
    page.check(report["batch_id"] == good and report["status"] == "DONE", str(report)[:300])
