"""The dashboard in a real browser (headless Chromium driven by Selenium) against the production
stack: paste a key, upload GunPoint, start a tiny-bert job from the form, watch its live progress
(SSE read with fetch, key in the header) reach `succeeded`, and see both plots load as images.

Skips, saying why, where Chromium, chromedriver or Selenium are missing; CI installs them
(``.ci/run`` with ``CI=true``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ProductionStack
from tests.e2e.test_gunpoint_end_to_end import export_with_cli

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
CHROMEDRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    SELENIUM = True
except ImportError:  # pragma: no cover - only without the dev extras
    SELENIUM = False


def _missing() -> str | None:
    if not SELENIUM:
        return "selenium is not installed (pip install -e '.[dev]')"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return (
            "headless Chromium is not installed: apt-get install chromium chromium-driver "
            f"(found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER})"
        )
    return None


MISSING = _missing()
# Checked before the stack starts, so a machine without a browser skips at once.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

JOB_TIMEOUT_SECONDS = 420


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Any, condition: Any, *, timeout: float, what: str, logs: str = "") -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        page = driver.find_element(By.TAG_NAME, "main").text
        console = driver.get_log("browser")
        raise AssertionError(
            f"timed out after {timeout:.0f}s waiting for {what}\n--- page ---\n{page[-3000:]}\n"
            f"--- console ---\n{console}\n{logs}"
        ) from None


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def fill(driver: Any, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def plot_loaded(driver: Any, name: str) -> bool:
    return bool(
        driver.execute_script(
            "const img = document.querySelector(arguments[0]);"
            "return !!img && !img.hidden && img.complete && img.naturalWidth > 0"
            " && img.src.startsWith('blob:');",
            f"#plot-{name} img",
        )
    )


def test_dashboard_uploads_trains_and_shows_live_progress_and_plots(
    production_stack: ProductionStack, browser: Any, tmp_path: Path
) -> None:
    client = production_stack.client
    base_url = client.base_url
    npz = export_with_cli("gunpoint", tmp_path / "gunpoint.npz")
    # Server text is shown as text: a dataset named like markup must not become markup.
    hostile = client.upload(npz, name='<b id="injected">bold</b>')

    browser.get(base_url + "/")
    assert browser.title == "ORCA dashboard"

    # A bad key is refused and says so; the real one lists this tenant's datasets.
    fill(browser, "api-key", "orca_not-a-real-key")
    browser.find_element(By.ID, "save-key").click()
    wait_until(
        browser,
        lambda d: "refused" in text_of(d, "key-status"),
        timeout=20,
        what="the bad key to be refused",
    )
    fill(browser, "api-key", client.api_key)
    browser.find_element(By.ID, "save-key").click()
    wait_until(
        browser,
        lambda d: "accepted" in text_of(d, "key-status"),
        timeout=20,
        what="the key to be accepted",
    )
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""
    assert browser.execute_script("return sessionStorage.getItem('orca_api_key')") == client.api_key
    assert client.api_key not in browser.current_url
    wait_until(
        browser,
        lambda d: hostile["id"] in text_of(d, "datasets-table"),
        timeout=20,
        what="the dataset list",
    )
    assert '<b id="injected">bold</b>' in text_of(browser, "datasets-table")
    assert not browser.find_elements(By.ID, "injected")

    # Upload through the form: the validation report is shown.
    browser.find_element(By.ID, "upload-file").send_keys(str(npz))
    fill(browser, "upload-name", "gunpoint-from-browser")
    browser.find_element(By.ID, "upload-submit").click()
    wait_until(
        browser,
        lambda d: "accepted:" in text_of(d, "upload-report"),
        timeout=60,
        what="the upload report",
        logs=production_stack.logs(),
    )
    report = text_of(browser, "upload-report")
    dataset_id = browser.find_element(By.ID, "upload-report").get_attribute("data-dataset-id")
    assert dataset_id and dataset_id in report and "classification" in report, report
    assert "train 50" in report and "test 150" in report, report
    assert (
        Select(browser.find_element(By.ID, "job-dataset")).first_selected_option.get_attribute(
            "value"
        )
        == dataset_id
    )

    # Start a job: a tiny random backbone keeps it short on a CPU; enough epochs (batch 8, about
    # 10 s) that the page's 1.5 s job poll sees progress strictly between 0 and 1.
    fill(browser, "job-name", "browser-job")
    fill(browser, "job-backbone", "tiny-bert")
    browser.find_element(By.ID, "job-allow-random-init").click()
    Select(browser.find_element(By.ID, "job-align-distance")).select_by_visible_text(
        "otdd_gaussian"
    )
    fill(browser, "job-align-epochs", "3")
    fill(browser, "job-max-samples", "64")
    fill(browser, "job-ft-epochs", "40")
    fill(browser, "job-batch-size", "8")
    browser.find_element(By.ID, "job-submit").click()
    wait_until(
        browser,
        lambda d: (
            "created job_" in text_of(d, "job-form-status")
            or "not created" in text_of(d, "job-form-status")
        ),
        timeout=30,
        what="the job to be created",
    )
    status_line = text_of(browser, "job-form-status")
    assert status_line.startswith("created "), status_line
    job_id = status_line.removeprefix("created ").strip()
    job = client.job(job_id)
    assert job["spec"]["backbone"] == "tiny-bert" and job["spec"]["allow_random_init"] is True
    assert job["spec"]["alignment"]["epochs"] == 3 and job["spec"]["finetune"]["epochs"] == 40
    assert job["spec"]["finetune"]["lr"] == "auto" and job["spec"]["task"]["type"] == "auto"

    # The page follows the job live: the watched job's status, progress and event log update.
    # (The recorder is the test's own instrumentation, run by the driver, not by the page.)
    assert text_of(browser, "job-detail-id") == job_id
    browser.execute_script(
        "window.progressSeen = [];"
        "setInterval(() => window.progressSeen.push("
        "document.getElementById('job-progress').value), 50);"
        # every event line the page appends, including those its 200-line cap drops later
        "window.eventLinesSeen = Array.from("
        "document.querySelectorAll('#job-events li'), (n) => n.textContent);"
        "new MutationObserver((changes) => changes.forEach((c) => c.addedNodes.forEach("
        "(n) => window.eventLinesSeen.push(n.textContent))))"
        ".observe(document.getElementById('job-events'), {childList: true});"
    )
    wait_until(
        browser,
        lambda d: text_of(d, "job-detail-status") in ("succeeded", "failed", "cancelled"),
        timeout=JOB_TIMEOUT_SECONDS,
        what=f"job {job_id} to finish in the page",
        logs=production_stack.logs(),
    )
    assert text_of(browser, "job-detail-status") == "succeeded", (
        text_of(browser, "job-detail-error"),
        production_stack.logs(),
    )
    wait_until(
        browser,
        lambda d: d.find_element(By.ID, "job-progress").get_attribute("value") == "1",
        timeout=20,
        what="the progress bar to be full",
    )
    progress_seen = browser.execute_script("return window.progressSeen")
    done = client.job(job_id)
    assert any(0 < value < 1 for value in progress_seen), (
        "progress never moved in between",
        done["started_at"],
        done["finished_at"],
    )
    # The page polls the job and follows the event stream separately, so the bar can be full a
    # moment before the stream has delivered its last events and the server's `end`.
    wait_until(
        browser,
        lambda d: text_of(d, "job-stream-state") == "finished",
        timeout=20,
        what="the event stream to end",
    )
    events = text_of(browser, "job-events")
    assert "metric" in events and "succeeded" in events, events
    # The list keeps the latest 200 lines; a job of a few hundred events pushes its alignment
    # lines out of view, so what the page appended along the way is checked as well.
    lines_seen = browser.execute_script("return window.eventLinesSeen")
    assert any("align epoch" in line for line in lines_seen), lines_seen[:20]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#job-events li")) <= 200

    wait_until(
        browser,
        lambda d: plot_loaded(d, "alignment") and plot_loaded(d, "training"),
        timeout=30,
        what="the alignment and training plots to load",
    )
    model_id = client.job(job_id)["model_id"]
    assert model_id
    wait_until(
        browser,
        lambda d: model_id in text_of(d, "models-table"),
        timeout=20,
        what="the model in the models list",
    )
    assert "accuracy" in text_of(browser, "models-table")

    # No script error and nothing blocked by the CSP (answers such as the bad key's 401 or a
    # plot's "no data yet" 404 are logged as failed loads; those are expected).
    problems = [
        entry
        for entry in browser.get_log("browser")
        if "Content Security Policy" in entry["message"]
        or (entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"])
    ]
    assert not problems, problems
