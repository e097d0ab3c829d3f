"""End to end in a real headless browser: `workbench app` serves the workspace, Debian's
chromium (driven through /usr/bin/chromedriver by Selenium) opens a feature page by URL and
waits for the highlighted contexts.

Nothing is downloaded: the driver path is given explicitly, so Selenium Manager never runs.
chromium and chromium-driver come from the project's set-up (`make install`); without them
this test fails — it is never skipped.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SAE = "tiny-topk"
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-proxy-server", "--window-size=1400,2000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server: subprocess.Popen, url: str, log: Path, timeout: float = 60) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, never a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"`workbench app` exited with {server.returncode}:\n{log.read_text()}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"no answer from {url} within {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture
def served(app_workspace, tmp_path):
    """`python -m workbench.cli app --db W --port P` in its own process group, always killed after."""
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "workbench.cli", "app", "--db", str(app_workspace), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,  # the group holds streamlit too
        )
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}/_stcore/health", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # `workbench app` and the streamlit it started
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "the browser test needs Debian's chromium and chromium-driver: run `make install` "
        "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def no_error_shown(browser, text: str) -> None:
    """No exception box and no error alert on the page (the corpus's own text may say "Error",
    e.g. a code example with ``printErrorList``, so words alone prove nothing)."""
    from selenium.webdriver.common.by import By

    assert "Traceback (most recent call last)" not in text
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    alerts = [a.text for a in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')]
    assert not any("rror" in a for a in alerts), alerts


def test_feature_page_in_a_real_browser(served, browser, busiest_feature, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{served}/Feature?sae={SAE}&feature={busiest_feature}")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "div.wb-example span.wb-token"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"))  # the histogram has drawn
    time.sleep(0.5)
    browser.save_screenshot(str(tmp_path / "feature.png"))

    text = browser.find_element(By.TAG_NAME, "body").text
    for expected in (f"Feature {busiest_feature}", "Density", "Top activations", "Quantile bands",
                     "Related features", "Logit effects"):
        assert expected in text
    no_error_shown(browser, text)
    examples = browser.find_elements(By.CSS_SELECTOR, "div.wb-example")
    assert len(examples) >= 20  # the top examples, plus the first band
    tokens = examples[0].find_elements(By.CSS_SELECTOR, "span.wb-token")
    lit = [t for t in tokens if "rgba(255, 145, 0, 0)" not in t.get_attribute("style")]
    assert tokens and lit, "the top example's own token is highlighted"
    assert browser.current_url.endswith(f"/Feature?sae={SAE}&feature={busiest_feature}")

    # a related feature's link opens its page and the address bar follows
    link = next(a for a in browser.find_elements(By.CSS_SELECTOR, "a") if a.text.startswith("feature "))
    other = link.text.split()[1]
    browser.execute_script("arguments[0].scrollIntoView()", link)
    link.click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == f"Feature {other}")
    wait.until(lambda d: d.current_url.endswith(f"feature={other}"))


def test_steering_page_in_a_real_browser(served, browser, busiest_feature, tmp_path):
    """The "steer with this" URL preselects the feature; Generate draws both continuations side by side."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{served}/Steering?sae={SAE}&feature={busiest_feature}")
    # Streamlit re-renders while the page settles: an element found a moment ago can go stale, so
    # every wait retries on that instead of failing.
    wait = WebDriverWait(browser, 90, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: d.find_elements(By.TAG_NAME, "h1") and d.find_element(By.TAG_NAME, "h1").text == "Steering")

    def click_generate(driver) -> bool:
        button = next((b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Generate"), None)
        if button is None:
            return False
        driver.execute_script("arguments[0].scrollIntoView()", button)
        button.click()
        return True

    wait.until(click_generate)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "div.wb-continuation")) == 2)
    browser.save_screenshot(str(tmp_path / "steering.png"))
    text = browser.find_element(By.TAG_NAME, "body").text
    for expected in ("Baseline", "Steered", "Strength sweep", "Download spec", f'"index": {busiest_feature}'):
        assert expected in text
    no_error_shown(browser, text)


def test_features_page_in_a_real_browser(served, browser, tmp_path):
    """The Features page draws its table and the map; a click on a map point opens that feature's page."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{served}/Features?sae={SAE}")
    wait = WebDriverWait(browser, 120, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: d.find_elements(By.TAG_NAME, "h1") and d.find_element(By.TAG_NAME, "h1").text == "Features")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer path.point")) >= 100)
    time.sleep(0.5)
    browser.save_screenshot(str(tmp_path / "features.png"))
    text = browser.find_element(By.TAG_NAME, "body").text
    for expected in ("Random live feature", "Map of decoder directions", "of 128 features", "t-SNE"):
        assert expected in text
    no_error_shown(browser, text)

    def click_a_point(driver) -> bool:
        points = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer path.point")
        if not points:
            return False
        point = points[len(points) // 2]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", point)
        ActionChains(driver).move_to_element(point).pause(0.3).click().perform()
        return True

    wait.until(click_a_point)
    wait.until(lambda d: d.find_elements(By.TAG_NAME, "h1") and d.find_element(By.TAG_NAME, "h1").text.startswith("Feature "))
    opened = browser.find_element(By.TAG_NAME, "h1").text.split()[1]
    wait.until(lambda d: d.current_url.endswith(f"/Feature?sae={SAE}&feature={opened}"))
