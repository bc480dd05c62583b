"""The viewer page: served live by `adag serve`, or written with its data as one offline HTML file."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

from adag.report.config import ReportConfig
from adag.report.data import payload_json, run_payload
from adag.stages import writing
from adag.store import atomic_write_bytes
from adag.view import RunView

STAGE = "report"
PLACEHOLDER = "__ADAG_DATA__"


def page_template() -> str:
    return resources.files("adag.report").joinpath("page.html").read_text(encoding="utf-8")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """One self-contained HTML file (no network needed to open it): RUN/report/report.html, or `out`."""
    if out is not None:
        path = Path(out)
        atomic_write_bytes(path, report_html(RunView.open(run_dir)))
        return path
    with writing(run_dir, STAGE, ReportConfig()) as (view, stage):
        atomic_write_bytes(stage.file("report.html"), report_html(view))
    return view.path / STAGE / "report.html"


def report_html(view: RunView) -> bytes:
    return page_template().replace(PLACEHOLDER, payload_json(run_payload(view))).encode("utf-8")


def report_command(run_dir: str, config: ReportConfig, out: str | None = None) -> Path:
    """`adag report`."""
    return write_report(run_dir, out)


def report_summary(path: Path, run_dir: str) -> str:
    return f"report written to {path}"


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for the viewer: the page at /, the run's data at /api/data."""
    data = json.dumps(run_payload(RunView.open(run_dir))).encode("utf-8")
    page = page_template().encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server naming
            route = self.path.split("?")[0]
            if route in ("/", "/index.html"):
                self._send(page, "text/html; charset=utf-8")
            elif route == "/api/data":
                self._send(data, "application/json")
            else:
                self.send_error(404)

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer((host, port), Handler)


def serve_in_background(run_dir: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    server = make_server(run_dir, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
