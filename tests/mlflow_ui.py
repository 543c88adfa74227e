"""Drive the MLflow UI as a person would: ``mlflow ui`` on loopback, Debian's chromium headless.

Shared by the browser test (tests/test_ui_browser.py, on a small study) and the screenshot
script (tests/screenshots.py, on the default job). Nothing is downloaded: the browser is
``/usr/bin/chromium`` driven through ``/usr/bin/chromedriver`` (Debian's ``chromium`` and
``chromium-driver`` packages) with Selenium. Selectors are the UI's own test ids and
component ids, and the texts a user reads.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# What works here as root, offline: no sandbox, no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")
RUN_NAME_CELL = '[role=row] [col-id="attributes.`Run Name`"]'
EXPAND_BUTTON = 'button[data-component-id*="runnamecellrenderer"]'
ASSISTANT_CLOSE = 'button[data-component-id="mlflow.assistant.chat_panel.close"]'
ROW_CHECKBOX = "input[type=checkbox][aria-label^='Press Space to toggle row selection']"
SHARED_VIEW_BANNER_CLOSE = 'button[data-component-id="mlflow.experiment_page.shared_view.dismiss"]'


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(store: str, timeout: float = 120) -> Iterator[str]:
    """``mlflow ui`` over tracking store ``store`` on 127.0.0.1; yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1",
                                   "--port", str(port), "--backend-store-uri", store, "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": store})
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=5):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        output = log.read().decode()[-3000:]
                        raise RuntimeError(f"mlflow ui did not start:\n{output}") from None
                    time.sleep(0.5)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


@contextlib.contextmanager
def chromium(width: int = 1500, height: int = 1000) -> Iterator:
    """A headless Debian chromium with a fresh profile, as a Selenium driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory() as profile:
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


class MlflowPages:
    """The pages of the MLflow UI a reader of a study visits, and what they show."""

    def __init__(self, driver, base: str, timeout: float = 60):
        self.driver, self.base, self.timeout = driver, base, timeout

    # waiting -------------------------------------------------------------------------------
    def wait_for(self, condition, what: str):
        """Poll ``condition(driver)`` until it is truthy; fail naming ``what`` otherwise."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, self.timeout, ignored_exceptions=(WebDriverException,)) \
                .until(condition)
        except Exception as exc:
            raise AssertionError(f"the page never showed {what}; it shows:\n"
                                 f"{self.text()[:2000]}") from exc

    def wait_for_text(self, text: str) -> None:
        self.wait_for(lambda d: text in self.text(), repr(text))

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def css(self, selector: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def open(self, route: str, **query) -> None:
        """Go to ``#/route?query`` and close the assistant panel, which hides a third of the page."""
        encoded = urllib.parse.urlencode(query, safe="[]\",`'")
        self.driver.get(f"{self.base}/#/{route}" + (f"?{encoded}" if encoded else ""))
        self.settle()
        self.close_assistant()

    def close_assistant(self) -> None:
        """Close the assistant panel, which takes a third of the page (it opens now and then)."""
        for button in self.css(ASSISTANT_CLOSE):
            if button.is_displayed():
                button.click()

    def settle(self, seconds: float = 1.0) -> None:
        """Let the page finish drawing (charts animate in) before it is read or photographed."""
        time.sleep(seconds)

    # the experiment's runs ---------------------------------------------------------------------
    def runs(self, experiment_id: str, **query) -> None:
        """The experiment's runs table (the *Model training* side of the UI)."""
        self.open(f"experiments/{experiment_id}/runs", workflowType="machine_learning", **query)
        self.wait_for(lambda d: "matching run" in self.text(), "the runs table")
        self.wait_for(lambda d: self.run_names(), "a run in the table")
        for button in self.css(SHARED_VIEW_BANNER_CLOSE):  # "You're viewing a shared view": read
            button.click()

    def run_names(self) -> list[str]:
        """The run names the table shows, top to bottom."""
        names = [cell.text.strip().splitlines() for cell in self.css(RUN_NAME_CELL)]
        return [lines[-1] for lines in names if lines and lines[-1] != "Run Name"]  # after the colour

    def expand_all(self) -> None:
        """Click every collapsed parent run's expander (a plus) until every nested run shows."""
        for _ in range(20):
            plus = [b for b in self.css(EXPAND_BUTTON) if b.is_displayed() and _is_collapsed(b)]
            if not plus:
                return
            before = len(self.run_names())
            plus[0].click()
            self.wait_for(lambda d, n=before: len(self.run_names()) > n, "the nested runs")

    def widen_names(self, pixels: int = 130) -> None:
        """Drag the Run Name column's edge to the right, as a reader does to read whole names."""
        from selenium.webdriver.common.action_chains import ActionChains

        edge = self.css('[role=columnheader][col-id="attributes.`Run Name`"] .ag-header-cell-resize')[0]
        ActionChains(self.driver).click_and_hold(edge).move_by_offset(pixels, 0).release().perform()
        self.settle()
        self.close_assistant()

    def choose_view(self, name: str) -> None:
        """Pick a saved view from the runs page's *Views* menu."""
        from selenium.webdriver.common.by import By

        self.css('[data-testid="saved-views-trigger"]')[0].click()
        item = self.wait_for(lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, "[role=menuitem]")
                                             if name in e.text), None), f"view {name!r} in the Views menu")
        item.click()
        self.wait_for(lambda d: name in self.css('[data-testid="saved-views-trigger"]')[0].text,
                      f"view {name!r} chosen")
        self.settle()

    def column_headers(self) -> list[str]:
        """The table's column headers, once each, in order (the grid draws some twice)."""
        return list(dict.fromkeys(h.text.strip() for h in self.css("[role=columnheader]") if h.text.strip()))

    def show_charts(self) -> None:
        """Switch the runs page to its chart view (one chart per metric, runs as lines)."""
        self.driver.execute_script("arguments[0].click()", self.css('[value="CHART"]')[0])
        self.wait_for(lambda d: self.css(".js-plotly-plot"), "charts")
        self.settle(3)

    def select(self, run_names: list[str]) -> None:
        """Tick the rows of ``run_names`` in the runs table."""
        ticked = 0
        for row in self.css("[role=row]"):
            if any(line in run_names for line in row.text.splitlines()):
                for box in row.find_elements("css selector", ROW_CHECKBOX):
                    self.driver.execute_script("arguments[0].click()", box)
                    ticked += 1
        assert ticked == len(run_names), f"ticked {ticked} of {run_names}"

    def compare_selected(self, metric: str) -> None:
        """*Compare* the ticked runs, then click ``metric`` on the comparison page: its chart."""
        from selenium.webdriver.common.by import By

        # next(..., None): a StopIteration would end the wait at once instead of polling again
        self.wait_for(lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, "button")
                                      if b.text == "Compare"), None), "the Compare button").click()
        link = self.wait_for(lambda d: next((a for a in d.find_elements(By.CSS_SELECTOR, "a")
                                             if (a.get_attribute("textContent") or "").strip() == metric),
                                            None),
                             f"a link to {metric!r}")
        self.driver.execute_script("arguments[0].scrollIntoView(); arguments[0].click()", link)
        self.wait_for(lambda d: "#/metric" in d.current_url and self.legend(), "the metric's chart")
        self.settle(2)

    # a run, and runs compared ---------------------------------------------------------------
    def run(self, experiment_id: str, run_id: str) -> None:
        """A run's page: its description, params, metrics and tags."""
        self.open(f"experiments/{experiment_id}/runs/{run_id}", workflowType="machine_learning")
        self.wait_for_text("Parameters")

    def legend(self) -> list[str]:
        """The legend entries of the metric page's chart: ``<run name> (<metric>)``."""
        return [line for line in self.text().splitlines() if re.fullmatch(r"\S+ \([a-z0-9_.]+\)", line)]

    def chart_titles(self) -> list[str]:
        """The titles of the chart cards of the runs page's chart view."""
        cards = self.css('[data-testid="experiment-view-compare-runs-card"]')
        return [card.text.strip().splitlines()[0] for card in cards if card.text.strip()]

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


def _is_collapsed(button) -> bool:
    """A run-name expander draws a plus in a square when collapsed, a minus when expanded."""
    return "V4.5h1.5" in (button.get_attribute("innerHTML") or "")
