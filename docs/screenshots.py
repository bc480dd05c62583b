"""Retake the README's screenshots of the viewer from a run (normally the demo's), in headless Chromium.

    make demo && .venv/bin/python docs/screenshots.py runs/demo

Writes docs/viewer.png (dataset cluster graph with the largest cluster's panel), docs/prompt-graph.png
(the first prompt's attribution graph, coloured by cluster) and
docs/supernodes.png (the same prompt with clusters collapsed into supernodes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adag.report import write_report  # noqa: E402
from tests.browser import chromium, click_cluster, open_page, redraw  # noqa: E402

DOCS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=str(DOCS), help="folder for the PNG files")
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as folder, chromium() as driver:
        path, _, _ = write_report(args.run_dir, str(Path(folder) / "report.html"))
        driver.set_window_size(1400, 1700)
        open_page(driver, path.as_uri())
        click_cluster(driver, 0)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.set_window_size(1400, 760)
        driver.save_screenshot(str(out / "viewer.png"))
        section = driver.find_element(By.ID, "neurons-section")
        driver.set_window_size(1400, section.size["height"] + 300)
        driver.execute_script("arguments[0].scrollIntoView()", section)
        redraw(driver, lambda: driver.find_element(By.CSS_SELECTOR, '#color-by option[value="cluster"]').click())
        section.screenshot(str(out / "prompt-graph.png"))
        redraw(driver, lambda: driver.find_element(By.ID, "supernodes").click())
        driver.execute_script("arguments[0].scrollIntoView()", section)
        section.screenshot(str(out / "supernodes.png"))
    print(f"screenshots written to {out}/viewer.png, prompt-graph.png, supernodes.png")


if __name__ == "__main__":
    main()
