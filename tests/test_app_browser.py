"""The app end to end: `streamlit run` on a free port, driven in headless Chromium by Selenium.

Uses Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them) by
their paths, so Selenium never downloads a browser or driver. The page's screenshot is kept
in ``test-artifacts/app.png``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from helpers import REPO_ROOT, free_port, subprocess_env
from openllm.runtime import OnnxGenerator
from test_app import APP, SCRIPT, STEPS, make_project

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "test-artifacts"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-gpu", "--window-size=1400,1000"]
WAIT = 60  # seconds, for anything the page does (the 2 shared CPU cores may be busy)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver; .ci/run installs them)",
)


@pytest.fixture(scope="module")
def project(session_dir: Path) -> Path:
    return make_project(session_dir / "app-project")  # the same folder as tests/test_app.py's


@pytest.fixture(scope="module")
def app_url(project: Path, tmp_path_factory) -> Iterator[str]:
    """The app served by `streamlit run` (as `make app` starts it), stopped afterwards."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
               "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(OPENLLM_ROOT=str(project)),
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:  # poll the health endpoint until the server answers
            assert server.poll() is None, f"streamlit exited with {server.returncode}:\n{log_path.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no answer from {url} in {WAIT}s:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def flat(text: str) -> str:
    """Whitespace-insensitive form: how a browser lays out text is not what we test."""
    return " ".join(text.split())


def test_compare_two_checkpoints_in_chromium(app_url: str, browser, project: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        compare_in_browser(app_url, browser, project)
    except Exception:
        browser.save_screenshot(str(ARTIFACTS / "app-failure.png"))  # what the page showed
        raise


def compare_in_browser(app_url: str, browser, project: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT, ignored_exceptions=(StaleElementReferenceException,))  # React redraws
    browser.get(app_url)

    # Pick the two checkpoints: empty the picker (it starts with a default), then choose each one.
    picker = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="stMultiSelect"] input'))
    picker.click()
    picker.send_keys(Keys.BACKSPACE, Keys.BACKSPACE)
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stMultiSelect"] span[data-tag]'))
    for step in STEPS:
        picker.send_keys(f"step-{step}")
        option = f'//*[@role="option"][normalize-space(.)="step-{step}"]'
        wait.until(lambda d: d.find_element(By.XPATH, option)).click()
    chips = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stMultiSelect"] span[data-tag]')
    assert [flat(c.text) for c in chips] == [f"step-{s}" for s in STEPS]

    code, notes = '[data-testid="stCode"] code', '[data-testid="stColumn"] [data-testid="stCaptionContainer"]'

    def finished(prompt: str):
        """The page shows ``prompt`` above the columns, and both columns their speed line."""
        def check(driver) -> bool:
            blocks = driver.find_elements(By.CSS_SELECTOR, code)
            speeds = [n for n in driver.find_elements(By.CSS_SELECTOR, notes) if "tokens/s" in n.text]
            return bool(blocks) and blocks[0].text == prompt and len(speeds) == 2
        return check

    def ask(prompt: str) -> list[str]:
        """Type ``prompt``, click Generate, wait for both columns to finish; return their texts."""
        old_notes = browser.find_elements(By.CSS_SELECTOR, notes)  # from the last comparison
        box = browser.find_element(By.CSS_SELECTOR, '[data-testid="stTextArea"] textarea')
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(prompt)
        box.send_keys(Keys.CONTROL, Keys.ENTER)  # apply the text (as leaving the box would)
        browser.find_element(By.XPATH, '//button[.//p[text()="Generate"]]').click()
        for note in old_notes:  # gone once the new comparison starts
            wait.until(staleness_of(note))
        wait.until(finished(prompt))
        return [c.text for c in browser.find_elements(By.CSS_SELECTOR, f'[data-testid="stColumn"] {code}')]

    texts = ask("ROMEO:")
    defaults = OnnxGenerator.load(project / "models" / "export" / "step-10").default_sampling
    expected = [OnnxGenerator.load(project / "models" / "export" / f"step-{s}").generate("ROMEO:", defaults).text
                for s in STEPS]
    assert [flat(t) for t in texts] == [flat(t) for t in expected]
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stColumn"] h3')]
    assert headings == [f"step-{s}" for s in STEPS]
    assert browser.save_screenshot(str(ARTIFACTS / "app.png"))

    # HTML in the prompt is displayed as text and never runs.
    ask(SCRIPT)
    assert browser.find_elements(By.CSS_SELECTOR, code)[0].text == SCRIPT
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    scripts = [s.get_attribute("innerHTML") or "" for s in browser.find_elements(By.TAG_NAME, "script")]
    assert not [s for s in scripts if "alert(1)" in s]

    # The checkpoints page, opened by its address: the app's own navigation, the table, two charts.
    browser.get(f"{app_url}/checkpoints")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]')) == 2)
    assert browser.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]')
    links = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNavLink"]')
    assert [link.text.split()[-1] for link in links] == ["Compare", "Checkpoints", "Inspect"]  # after each icon's name


def test_inspect_page_in_chromium(app_url: str, browser, project: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        inspect_in_browser(app_url, browser, project)
    except Exception:
        browser.save_screenshot(str(ARTIFACTS / "app-inspect-failure.png"))
        raise


def inspect_in_browser(app_url: str, browser, project: Path) -> None:
    """Surprisal spans per checkpoint with their bits as tooltips, next-token tables, the attention map."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from openllm.inspection import token_surprisals

    wait = WebDriverWait(browser, WAIT, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"{app_url}/inspect")
    text = "ROMEO:\nBut, soft! what light"
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="stTextArea"] textarea'))
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.CONTROL, Keys.ENTER)  # apply the text

    def columns(driver):
        """Each column's token tooltips, once both columns show the new text."""
        found = [[span.get_attribute("title") for span in block.find_elements(By.CSS_SELECTOR, "span.token")]
                 for block in driver.find_elements(By.CSS_SELECTOR, "div.surprisal")]
        return found if len(found) == 2 and all(len(f) == len(found[0]) for f in found) else None

    want = [token_surprisals(OnnxGenerator.load(project / "models" / "export" / f"step-{s}"), text) for s in STEPS]
    wait.until(lambda d: columns(d) and len(columns(d)[0]) == len(want[0]))
    for titles, tokens in zip(columns(browser), want):
        assert titles == ["first token: not predicted"] + [f"{t.bits:.2f} bits" for t in tokens[1:]]
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]')) == 2)
    chart = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]'))
    browser.set_window_size(1400, 2100)  # the whole page in one picture
    try:
        wait.until(lambda d: chart.size["height"] > 100)
        time.sleep(1)  # let the chart finish drawing
        assert browser.save_screenshot(str(ARTIFACTS / "app-inspect.png"))
    finally:
        browser.set_window_size(1400, 1000)
