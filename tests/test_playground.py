"""The playground page in a real browser (Debian's headless Chromium, driven by selenium) against the whole
application served over HTTP by uvicorn in this process (tiny random Llama, transformers engine, real
MiniLM index and trainer): a prompt goes in, both answers, the picked documents, both curves and the stage
timings come out, with no console error; the API's errors are shown as the API words them; the page fits a
phone's width. The screenshot goes to `$SIFT_SERVE_PLAYGROUND_SCREENSHOT` when set, else next to the test's
temporary files; with `SIFT_SERVE_PLAYGROUND_MODEL=default` the server runs the default model over the
default index instead of the tiny one (how `docs/playground.png` is made:
`SIFT_SERVE_PLAYGROUND_MODEL=default SIFT_SERVE_PLAYGROUND_SCREENSHOT=docs/playground.png pytest
tests/test_playground.py -k prompt`)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from serving.app import create_app
from tests.conftest import tiny_app_settings, tiny_llama_dir, uvicorn_thread

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/setup_venv.sh installs them when run as root)",
)
STEPS = 3


@pytest.fixture(scope="module")
def url(tmp_path_factory, small_index, default_model_dir):
    from selection.build import default_index_dir
    from serving.config import Settings
    from serving.openai_server import local_server

    adaptation = {"candidates": 20, "max_steps": STEPS, "max_train_tokens": 32, "min_gain": 0.0}
    generator = {"max_model_len": 256, "adapter_dir": str(tmp_path_factory.mktemp("adapters"))}
    if os.environ.get("SIFT_SERVE_PLAYGROUND_MODEL") == "default":
        settings = tiny_app_settings(
            default_model_dir,
            default_index_dir(Settings().models),
            adaptation={**adaptation, "max_train_tokens": 256},
            generator={**generator, "max_model_len": 2048},
        )
    else:
        tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")
        settings = tiny_app_settings(tiny, small_index.directory, adaptation=adaptation, generator=generator)
    with uvicorn_thread(create_app(local_server(settings))) as root:
        yield root


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1500")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def wait_for(condition, seconds: float = 180.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("the page did not get there in time")


def test_a_prompt_shows_its_documents_curves_timings_and_both_answers(browser, url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.set_window_size(1280, 1500)
    browser.get(f"{url}/playground")
    find = browser.find_element
    find(By.ID, "steps").clear()
    find(By.ID, "steps").send_keys(str(STEPS))
    find(By.ID, "gain_budget").send_keys("0")  # every pick trained: one loss point per pick
    find(By.ID, "max_tokens").clear()
    find(By.ID, "max_tokens").send_keys("48")
    prompt = find(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("How do I read rows from a CSV file?")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard runs it
    wait_for(lambda: find(By.ID, "status").text.startswith("Done"))
    documents = browser.find_elements(By.CSS_SELECTOR, "#documents li")
    assert len(documents) == STEPS and all("σ²" in d.text for d in documents)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#sigma2 circle")) == STEPS
    assert len(browser.find_elements(By.CSS_SELECTOR, "#loss circle")) == STEPS
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#timings tr")]
    assert [r.split()[0] for r in rows[:6]] == ["queue", "merge", "select", "train", "load_adapter", "generate"]
    assert float(rows[3].split()[1]) > 0  # training took time
    answers = [find(By.ID, pane).get_attribute("textContent") for pane in ("adapted", "base")]
    assert all(answers), answers
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    shot = Path(os.environ.get("SIFT_SERVE_PLAYGROUND_SCREENSHOT", tmp_path / "playground.png"))
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_api_errors_are_shown_as_the_api_words_them(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{url}/playground")
    Select(browser.find_element(By.ID, "mode")).select_by_value("merge")  # this index has no experts
    browser.find_element(By.ID, "run").click()
    status = wait_for(lambda: "".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, "#status.error")))
    assert "needs the index's expert adapters" in status and "sift-serve experts build" in status


def test_the_page_fits_a_phone(browser, url):
    browser.set_window_size(390, 844)
    browser.get(f"{url}/playground")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390
    browser.set_window_size(1280, 1500)
