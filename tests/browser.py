"""Headless Chromium via Selenium (Debian's chromium and chromium-driver, installed by `make install`,
or any Chromium and chromedriver on PATH; else Selenium's driver manager finds them), and what the
viewer tests measure in the page."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
         "--window-size=1400,1100"]

# Boxes in page pixels: circles as (cx, cy, r), texts as (left, top, right, bottom) with their own text.
GEOMETRY = """
const svg = document.getElementById(arguments[0]);
const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const texts = (selector) => [...svg.querySelectorAll(selector)].map(t => ({text: t.firstChild.nodeValue,
  cls: t.getAttribute("class") || "",
  full: t.querySelector("title") ? t.querySelector("title").textContent : null, box: box(t)}));
return {
  svg: box(svg),
  circles: [...svg.querySelectorAll("circle")].map(c => { const r = c.getBoundingClientRect();
    return [(r.left + r.right) / 2, (r.top + r.bottom) / 2, r.width / 2]; }),
  tokens: texts(".token-label"), clusters: texts(".cluster-label"),
  others: texts("text:not(.token-label):not(.cluster-label)"),
};
"""


@contextmanager
def chromium():
    with tempfile.TemporaryDirectory() as profile:
        options = Options()
        browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
        if browser:
            options.binary_location = browser
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def set_viewport(driver, width: int, height: int) -> None:
    """Size the window so that the page itself (the viewport) is width x height CSS pixels."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])


def open_page(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")


def click_cluster(driver, cluster: int) -> None:
    driver.find_element(By.CSS_SELECTOR, f'g.cluster-node[data-cluster="{cluster}"] circle').click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "panel-label"))


def geometry(driver, svg_id: str) -> dict:
    return driver.execute_script(GEOMETRY, svg_id)


def redraw(driver, action) -> None:
    """Run `action` (which changes the prompt graph's settings) and wait until the graph is redrawn."""
    before = driver.find_element(By.ID, "neurons").get_attribute("data-drawn")
    action()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "neurons").get_attribute("data-drawn") != before)


def set_range(driver, element_id: str, value: int) -> None:
    """Move a range input and fire its input event, as dragging it does."""
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, value)


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def select(driver, **choice) -> dict:
    """window.adag.select(choice) (keys as the page's URL uses them); the page's state once it is drawn."""
    answer = driver.execute_async_script("const done = arguments[arguments.length - 1];"
                                         "window.adag.select(arguments[0]).then(done, e => done({error: String(e)}))",
                                         choice)
    assert "error" not in answer, answer
    return answer


def page_state(driver) -> dict:
    return driver.execute_script("return window.adag.state()")
