"""Headless Chromium (Debian's chromium and chromium-driver, installed by `make install`) via Selenium."""

from __future__ import annotations

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


@contextmanager
def chromium():
    with tempfile.TemporaryDirectory() as profile:
        options = Options()
        options.binary_location = "/usr/bin/chromium"
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")


def click_cluster(driver, cluster: int) -> None:
    driver.find_element(By.CSS_SELECTOR, f'g.cluster-node[data-cluster="{cluster}"]').click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "panel-label"))
