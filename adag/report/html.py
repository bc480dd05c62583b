"""The viewer page: served live by `adag serve`, or written with its data as one offline HTML file."""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import ipaddress
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from adag.errors import AdagError
from adag.report.data import chosen_prompts, payload_json, prompt_payload, read_tables, run_payload
from adag.store import atomic_write_bytes

DATA_PLACEHOLDER = "__ADAG_DATA__"
CSP_PLACEHOLDER = "__ADAG_CSP__"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}
CACHED_GRAPHS = 256


class ReportConfig(BaseModel):
    """Which prompts' attribution graphs a report embeds (the cluster views are always in it)."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(50, ge=0, description="embed the attribution graphs of this many prompts, those with "
                                               "the largest total |attribution|")
    prompt_ids: list[int] | None = Field(None, description="embed the graphs of these prompt ids instead")


def page_template() -> str:
    return resources.files("adag.report").joinpath("page.html").read_text(encoding="utf-8")


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def content_security_policy(template: str) -> str:
    """Allow only the page's own inline script and style (by hash), data: images and requests to the
    page's own origin."""
    script = re.search(r"<script>(.*?)</script>", template, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", template, re.S).group(1)
    return (f"default-src 'none'; script-src {_sha256_source(script)}; style-src {_sha256_source(style)}; "
            "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'")


def render_page(data_json: str = DATA_PLACEHOLDER) -> str:
    template = page_template()
    return template.replace(CSP_PLACEHOLDER, content_security_policy(template)).replace(DATA_PLACEHOLDER, data_json)


def write_report(run_dir: str, out: str | None = None, config: ReportConfig | None = None) -> tuple[Path, int, int]:
    """One self-contained HTML file (no network needed to open it), default RUN_DIR/report.html.
    Returns its path, the number of prompt graphs embedded and the number of prompts."""
    config = config or ReportConfig()
    tables = read_tables(run_dir)
    chosen = chosen_prompts(tables, config.prompts, config.prompt_ids)
    html = render_page(payload_json(run_payload(tables, chosen)))
    path = Path(out) if out else tables.run.path / "report.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path, len(chosen), len(tables.prompts)


def allowed_host(header: str | None, bound: str) -> bool:
    """Only the bound address or localhost, so that a page from another site cannot read the data by
    pointing its own name at this machine (DNS rebinding). A server bound to every interface also
    answers to any IP address, which no rebinding can forge."""
    if not header:
        return False
    try:
        name = urlsplit("//" + header).hostname
    except ValueError:
        return False
    if name is None:
        return False
    if name in LOCAL_HOSTS or name == bound.lower().strip("[]"):
        return True
    if bound in WILDCARD_HOSTS:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True
    return False


def _listen(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    if not 0 <= port <= 65535:
        raise AdagError(f"--port {port} is out of range; use 1024..65535 (or 0 for any free port)")
    try:
        return ThreadingHTTPServer((host, port), handler)
    except socket.gaierror:
        raise AdagError(f"--host {host} is not a known address; use 127.0.0.1 (this machine only), "
                        "0.0.0.0 (every interface) or an address of this machine") from None
    except OSError as error:
        if error.errno == errno.EADDRNOTAVAIL:
            raise AdagError(f"--host {host} is not an address of this machine; use 127.0.0.1 (this machine "
                            "only) or 0.0.0.0 (every interface)") from None
        if error.errno == errno.EADDRINUSE:
            raise AdagError(f"port {port} on {host} is in use; choose another --port (or --port 0 for any "
                            "free port)") from None
        if error.errno == errno.EACCES:
            raise AdagError(f"not allowed to listen on port {port}; choose --port 1024 or above") from None
        raise AdagError(f"cannot listen on {host}:{port} ({error.strerror})") from None


def make_server(run_dir: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for the viewer: the page at /, the run's cluster views at /api/data and each
    prompt's attribution graph at /api/prompt/ID, computed when first asked for."""
    tables = read_tables(run_dir)
    data = json.dumps(run_payload(tables, [])).encode("utf-8")
    template = page_template()
    page = render_page().encode("utf-8")
    policy = content_security_policy(template) + "; frame-ancestors 'none'"
    known = set(tables.prompts["prompt"].tolist())
    lock = threading.Lock()

    @functools.lru_cache(maxsize=CACHED_GRAPHS)
    def prompt_json(prompt: int) -> bytes:
        with lock:  # pandas reads of shared frames from several threads
            return json.dumps(prompt_payload(tables, prompt)).encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def version_string(self) -> str:
            return "adag"

        def do_GET(self):  # noqa: N802 - http.server naming
            if not allowed_host(self.headers.get("Host"), host):
                self.send_error(403, "unexpected Host header")
                return
            route = urlsplit(self.path).path
            match = re.fullmatch(r"/api/prompt/(\d+)", route)
            if route in ("/", "/index.html"):
                self._send(page, "text/html; charset=utf-8")
            elif route == "/api/data":
                self._send(data, "application/json")
            elif match and int(match.group(1)) in known:
                self._send(prompt_json(int(match.group(1))), "application/json")
            else:
                self.send_error(404)

        def end_headers(self) -> None:
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", policy)
            self.send_header("Referrer-Policy", "no-referrer")
            super().end_headers()

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return _listen(host, port, Handler)


def serve_in_background(run_dir: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    server = make_server(run_dir, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
