"""A small HTTP server on 127.0.0.1 that speaks the OpenAI chat completions protocol, for tests.

By default it answers like a cooperative model: a JSON list of the requested length for simulator
prompts, yes or no to a judge (by the parity of the prompt's length), a short phrase otherwise.
`script` holds replies to send first: (status, body) pairs, where a body of None means "answer
normally".
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reply_body(content: str, logprobs: list[tuple[str, dict[str, float]]] | None = None) -> dict:
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    if logprobs is not None:
        choice["logprobs"] = {"content": [
            {"token": token, "logprob": alts.get(token, -0.1), "bytes": None,
             "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in alts.items()]}
            for token, alts in logprobs]}
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "fake", "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def cooperative(request: dict) -> dict:
    text = request["messages"][-1]["content"]
    wanted = re.search(r"JSON list of (\d+) integers", text)
    if wanted:
        n = int(wanted.group(1))
        return reply_body(json.dumps([(i * 3) % 11 for i in range(n)]))
    if "label of one to three" in text:
        return reply_body("capital city")
    if "Answer with yes or no only" in text:  # a judge: some yes, some no, deterministically
        return reply_body("Yes" if len(text) % 2 else "No")
    return reply_body("names of countries")


class FakeOpenAI:
    def __init__(self, script: list[tuple[int, dict | str | None]] | None = None):
        self.script = list(script or [])
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                status, payload = outer.script.pop(0) if outer.script else (200, None)
                payload = cooperative(body) if payload is None else payload
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("retry-after-ms", "10")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
