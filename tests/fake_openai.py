"""A small HTTP server on 127.0.0.1 that speaks the OpenAI chat completions API (POST .../chat/completions)
and the Anthropic Messages API (POST .../messages), for tests.

By default it answers like a cooperative model: a JSON list of the requested length for simulator
prompts, yes or no to a judge (by the parity of the prompt's length), a short phrase otherwise.
`script` holds replies to send first: (status, body) pairs, where a body of None means "answer
normally", a str is sent as the raw body (so a cut-off JSON document can be sent), and HANG accepts
the request and never answers. `respond` replaces the cooperative answers: it gets the request's last
user message and returns the reply text (see `reading_model`). Every reply waits `delay` seconds first.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HANG = object()


def reply_body(content: str, logprobs: list[tuple[str, dict[str, float]]] | None = None) -> dict:
    """An OpenAI chat completion with `content` (and per-token log-probabilities if given)."""
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    if logprobs is not None:
        choice["logprobs"] = {"content": [
            {"token": token, "logprob": alts.get(token, -0.1), "bytes": None,
             "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in alts.items()]}
            for token, alts in logprobs]}
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "fake", "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def message_body(content: str) -> dict:
    """An Anthropic Messages API reply with `content`."""
    return {"id": "msg_x", "type": "message", "role": "assistant", "model": "fake", "stop_reason": "end_turn",
            "stop_sequence": None, "content": [{"type": "text", "text": content}],
            "usage": {"input_tokens": 10, "output_tokens": 5}}


def error_body(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def cooperative(text: str) -> str:
    wanted = re.search(r"JSON list of (\d+) integers", text)
    if wanted:
        return json.dumps([(i * 3) % 11 for i in range(int(wanted.group(1)))])
    if "label of one to" in text:
        return "capital city"
    if "Answer with yes or no only" in text:  # a judge: some yes, some no, deterministically
        return "Yes" if len(text) % 2 else "No"
    return "names of countries"


def reading_model(text: str) -> str:
    """A stand-in that really reads the prompts, to test their plumbing: as explainer it lists the
    highlighted strings of the excerpts it was sent; as simulator it reads the numbered token lines and
    gives 10 to each token quoted in the description, 0 to the others."""
    listing = re.findall(r"^(\d+)\t(\".*\")$", text, flags=re.MULTILINE)
    if listing:
        described = re.search(r'described as: "(.*)"\. Below', text, flags=re.DOTALL).group(1)
        quoted = {q.strip() for q in re.findall(r"'([^']+)'", described)}
        return json.dumps([10 if json.loads(token).strip() in quoted else 0 for _, token in listing])
    if "label of one to" in text:
        return "highlighted tokens"
    marked = list(dict.fromkeys(m.strip() for m in re.findall(r"\{\{(.*?)\}\}", text)))
    return "the tokens " + ", ".join(f"'{m}'" for m in marked[:5]) if marked else "nothing in particular"


def asked(body: dict) -> str:
    """What a request asks: its last turn, after the system turn when there is no other (a simulator puts
    its task and the description there, and the record in the user's turn)."""
    turns = body["messages"]
    system = body.get("system") or (turns[0]["content"] if turns[0]["role"] == "system" else "")
    if system and len([turn for turn in turns if turn["role"] != "system"]) == 1:
        return f"{system}\n\n{turns[-1]['content']}"
    return turns[-1]["content"]


class QuietServer(ThreadingHTTPServer):
    """Says nothing when a client went away mid-reply (a killed describe): that is what tests do to it."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeOpenAI:
    def __init__(self, script: list[tuple[int, object]] | None = None, respond: Callable[[str], str] = cooperative,
                 delay: float = 0.0):
        self.script = list(script or [])
        self.requests: list[dict] = []
        self.released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server naming
                length = int(self.headers["Content-Length"])
                raw = self.rfile.read(length)
                if len(raw) < length:  # the client went away while sending
                    return
                body = json.loads(raw)
                outer.requests.append(body)
                status, payload = outer.script.pop(0) if outer.script else (200, None)
                time.sleep(delay)
                if payload is HANG:
                    outer.released.wait()
                    return
                if payload is None:
                    text = respond(asked(body))
                    payload = message_body(text) if self.path.endswith("/messages") else reply_body(text)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status in (429, 529):
                    self.send_header("retry-after-ms", "10")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
