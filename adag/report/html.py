"""The viewer page: served live by `adag serve`, or written with its data as one offline HTML file."""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from adag.errors import AdagError
from adag.outputs import output_file, write
from adag.pipeline import StageResult, Summary, writing
from adag.report.config import REPORT_FORMATS, REPORT_STAGE, ReportConfig
from adag.report.data import chosen_prompts, payload_json, prompt_payload, run_payload
from adag.report.steering import MAX_BODY, Steerer, SteerRequestError
from adag.store import RunDir, atomic_write_bytes
from adag.view import RunView

STAGE = REPORT_STAGE.name
DATA_PLACEHOLDER = "__ADAG_DATA__"
CSP_PLACEHOLDER = "__ADAG_CSP__"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
NOTEBOOK_FRAMERS = "http://localhost:* http://127.0.0.1:*"  # the pages that may frame an embeddable viewer
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}
CACHED_GRAPHS = 256
HANGUPS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)  # a client went away
log = logging.getLogger("adag")


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


def write_report(run_dir: str | Path, out: str | Path | None = None,
                 config: ReportConfig | None = None) -> tuple[Path, int, int]:
    """One self-contained HTML file (no network needed to open it): RUN/report/report.html, or `out`.
    Returns its path, the number of prompt graphs embedded and the number of prompts."""
    config = config or ReportConfig()
    if out is not None:
        output_file(out, REPORT_FORMATS)  # before the work
        html, embedded, total = report_html(RunView.open(run_dir), config)
        return write(out, html, REPORT_FORMATS), embedded, total
    with writing(run_dir, REPORT_STAGE, config) as (view, stage):
        html, embedded, total = report_html(view, config)
        atomic_write_bytes(stage.file("report.html"), html)
        stage.facts.update(embedded=embedded, prompts=total)
    return view.path / STAGE / "report.html", embedded, total


SHOWN_IF_CURRENT = ("describe", "steer")  # the stages whose results the page shows when they are current


def warn_stale(view: RunView) -> None:
    """Say which results the page leaves out because they are stale, and the command that brings them back."""
    for stage in SHOWN_IF_CURRENT:
        if view.run.stage_state(stage) == "stale":
            log.warning(f"the '{stage}' results are stale (a stage they were computed from was rerun), so the page "
                        f"leaves them out; rerun `{view.run.command(stage)}` to show them")


def report_html(view: RunView, config: ReportConfig) -> tuple[bytes, int, int]:
    view.require("cluster")
    warn_stale(view)
    chosen = chosen_prompts(view, config.prompt_count, config.prompt_ids)
    return render_page(payload_json(run_payload(view, chosen))).encode("utf-8"), len(chosen), len(view.prompts)


def report_run(run_dir: str, config: ReportConfig, out: str | None = None) -> StageResult:
    """`adag report`."""
    path, embedded, total = write_report(run_dir, out, config)
    return StageResult(RunDir.open(run_dir), {"embedded": embedded, "prompts": total}, file=path)


def report_summary(result: StageResult) -> Summary:
    embedded, total = result.facts["embedded"], result.facts["prompts"]
    left_out = f"; {total - embedded} left out, `adag serve` shows them all" if embedded < total else ""
    return Summary(f"report written to {result.file} (attribution graphs of {embedded} of {total} prompts{left_out})")


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


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise AdagError(f"--port {port} is out of range; use 1024..65535 (or 0 for any free port)")


class GuardedHandler(BaseHTTPRequestHandler):
    """Requests answered by `_get` and `_post`. A client that hangs up before its reply (a cancelled steer)
    ends its connection quietly; anything else that goes wrong is a 500 and one line on the server's terminal."""

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except HANGUPS:
            self.close_connection = True

    def do_GET(self):  # noqa: N802 - http.server naming
        self._answer(self._get)

    def do_POST(self):  # noqa: N802 - http.server naming
        self._answer(self._post)

    def _get(self) -> None:
        self.send_error(404)

    def _post(self) -> None:
        self.send_error(404)

    def _answer(self, method: Callable[[], None]) -> None:
        try:
            method()
        except HANGUPS:
            raise
        except Exception as error:  # noqa: BLE001 - one request must not stop the server or flood its terminal
            reason = str(error).splitlines()[0][:200] if str(error) else ""
            log.warning(f"{self.command} {self.path[:80]} failed: {type(error).__name__}: {reason}")
            with contextlib.suppress(OSError):
                self.send_error(500, "the request failed; see the server's terminal")
            self.close_connection = True


class ViewerHandler(GuardedHandler):
    """The viewer's request plumbing: a JSON body within MAX_BODY, the security headers, one reply."""

    embeddable = False  # whether local pages (a Jupyter notebook) may show the page in a frame
    policy = ""  # the Content-Security-Policy header

    def version_string(self) -> str:
        return "adag"

    def _body(self) -> bytes:
        """The request body, refused unless it is JSON (which a page of another site cannot send
        here without asking first) of a stated length within MAX_BODY."""
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise SteerRequestError("send the request as Content-Type: application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise SteerRequestError("the request needs a Content-Length header") from None
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise SteerRequestError(f"request body of {length} bytes is over the limit of {MAX_BODY}; "
                                    "name fewer nodes, or steer a cluster")
        return self.rfile.read(length)

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        if not self.embeddable:
            self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", self.policy)
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def _send(self, body: bytes, kind: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass



class ViewerServer(ThreadingHTTPServer):
    """The viewer's server: a client's hang-up is not an error, and no error prints a traceback. Closing it
    waits for the work in progress (`finish`), so that the process never exits with a model running."""

    finish: Callable[[], None] = staticmethod(lambda: None)

    def server_close(self) -> None:
        super().server_close()
        self.finish()

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, HANGUPS):
            log.warning(f"a request from {client_address[0]} failed: {type(error).__name__}: {error}")


def _listen(host: str, port: int, handler: type[BaseHTTPRequestHandler],
            finish: Callable[[], None] | None = None) -> ThreadingHTTPServer:
    """Bind; an empty host (every interface, by accident) is refused, and a server reachable from other
    machines says so in one warning."""
    if not host.strip():
        raise AdagError("--host is empty; give 127.0.0.1 (this machine only) or, to be reachable from other "
                        "machines, 0.0.0.0 (every interface)")
    try:
        server = ViewerServer((host, port), handler)
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
    if not ipaddress.ip_address(server.server_address[0]).is_loopback:
        log.warning(f"--host {host} serves this run to every machine that can reach this one, without a "
                    "password; use 127.0.0.1 to keep it on this machine")
    if finish is not None:
        server.finish = finish
    return server


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
                load_model: Callable | None = None, embeddable: bool = False) -> ThreadingHTTPServer:
    """An HTTP server for the viewer: the page at /, the run's cluster views at /api/data, each
    prompt's attribution graph at /api/prompt/ID, computed when first asked for, and steering at
    POST /api/steer (the run's model, or `load_model()`, loaded on the first steer request).
    `embeddable`: pages of this machine (a local Jupyter) may show it in a frame; else no page may."""
    check_port(port)
    view = RunView.open(run_dir)
    steerer = Steerer(view, load_model)
    data = json.dumps(run_payload(view, [])).encode("utf-8")
    for grouped in ("nodes_by_prompt", "embeddings_by_prompt", "edges_by_prompt"):  # once, before serving
        getattr(view, grouped)
    template = page_template()
    page = render_page().encode("utf-8")
    framers = NOTEBOOK_FRAMERS if embeddable else "'none'"
    embeddable_here, csp = embeddable, content_security_policy(template) + f"; frame-ancestors {framers}"
    known = set(view.prompts["prompt"].tolist())
    lock = threading.Lock()

    @functools.lru_cache(maxsize=CACHED_GRAPHS)
    def prompt_json(prompt: int) -> bytes:
        with lock:  # pandas reads of shared frames from several threads
            return json.dumps(prompt_payload(view, prompt)).encode("utf-8")

    class Handler(ViewerHandler):
        embeddable, policy = embeddable_here, csp

        def _get(self) -> None:
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

        def _post(self) -> None:
            if not allowed_host(self.headers.get("Host"), host):
                self.send_error(403, "unexpected Host header")
                return
            if urlsplit(self.path).path != "/api/steer":
                self.send_error(404)
                return
            try:
                request = steerer.parse(self._body())
            except SteerRequestError as error:
                self._send(f"{error}\n".encode(), "text/plain; charset=utf-8", 400)
                return
            self._send(json.dumps(steerer(request)).encode("utf-8"), "application/json")

    return _listen(host, port, Handler, steerer.stop)


def serve_in_background(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                        load_model: Callable | None = None, embeddable: bool = False) -> ThreadingHTTPServer:
    server = make_server(run_dir, host, port, load_model, embeddable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
