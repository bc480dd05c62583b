"""Retake the viewer screenshots of README and docs/guide.md from a run (normally the demo's), in headless
Chromium.

    make demo && .venv/bin/python docs/screenshots.py runs/demo

Writes docs/viewer.png (the window at 1400x900: the first prompt's attribution graph with its most
present cluster selected in the side panel and the answer's strongest path pinned), docs/viewer-1000.png
(the same at 1000x700) and docs/cluster-graph.png (the dataset cluster graph).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adag.report import write_report  # noqa: E402
from tests.browser import chromium, click_cluster, open_page, select, set_viewport  # noqa: E402

DOCS = Path(__file__).resolve().parent

# The cluster with most drawn neurons, the top logit and the source of its strongest positive input.
PICK = """
const circles = [...document.querySelectorAll('#neurons circle[data-kind=neuron]')].map(c => Number(c.dataset.cluster));
const counts = {};
for (const c of circles) if (c >= 0) counts[c] = (counts[c] || 0) + 1;
const cluster = Number(Object.entries(counts).sort((a, b) => b[1] - a[1])[0][0]);
const into = window.adag.drawn().edges.filter(e => e[1] === 'l:0' && e[2] > 0).sort((a, b) => b[2] - a[2]);
return [cluster, 'l:0', into.length ? into[0][0] : null];
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=str(DOCS), help="folder for the PNG files")
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as folder, chromium() as driver:
        path, _, _ = write_report(args.run_dir, str(Path(folder) / "report.html"))
        set_viewport(driver, 1400, 900)
        open_page(driver, path.as_uri())
        cluster, *pins = driver.execute_script(PICK)
        click_cluster(driver, cluster)
        select(driver, pins=[key for key in pins if key])
        url = driver.current_url
        for (width, height), name in (((1400, 900), "viewer.png"), ((1000, 700), "viewer-1000.png")):
            set_viewport(driver, width, height)
            driver.get("about:blank")
            open_page(driver, url)
            driver.save_screenshot(str(out / name))
        set_viewport(driver, 1400, 900)
        driver.get("about:blank")
        open_page(driver, url)
        section = driver.find_element(By.ID, "cluster-section")
        driver.execute_script("arguments[0].scrollIntoView()", section)
        section.screenshot(str(out / "cluster-graph.png"))
    print(f"screenshots written to {out}/viewer.png, viewer-1000.png, cluster-graph.png")


if __name__ == "__main__":
    main()
