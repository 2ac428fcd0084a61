"""An HTTP test double of Ollama's REST API, for driving the real ``ollama`` client.

No Ollama server can run on the test machines, so this serves the endpoints the client
calls (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``) from a script:
answers returned in order, each a string, a ``Reply`` with a delay (the too-slow model)
or a callable of the request body. It records every request it received so that a test
can assert on the prompts.

    with OllamaDouble(['{"rationale": "", "items": [...]}']) as double:
        spec = PlannerSpec(strategy="ollama", model="scripted", host=double.url)
        ...
        assert "tests" in double.prompts[0]
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer, sent after ``delay_s`` (or at once when the double stops)."""

    content: str
    delay_s: float = 0.0


Answer = str | Reply | Callable[[dict[str, Any]], "str | Reply"]


@dataclass(frozen=True)
class Received:
    """One request the double received: method, path and JSON body."""

    method: str
    path: str
    body: dict[str, Any]

    @property
    def text(self) -> str:
        """Everything the client asked: the chat messages' contents, or the prompt."""
        if "messages" in self.body:
            return "\n".join(str(m.get("content", "")) for m in self.body["messages"])
        return str(self.body.get("system", "")) + "\n" + str(self.body.get("prompt", ""))


class OllamaDouble:
    """A threaded HTTP server on a free loopback port that answers like Ollama.

    ``answers`` are used one per chat or generate request, in order; when they run
    out the double answers HTTP 500, so a test sees a request it did not script.
    Models other than ``models`` get Ollama's 404 ``model '...' not found``.
    """

    def __init__(self, answers: Iterable[Answer] = (), *, models: Iterable[str] = ("scripted",),
                 delay_s: float = 0.0):
        self.models = list(models)
        self.delay_s = delay_s
        self.received: list[Received] = []
        self._answers = list(answers)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> OllamaDouble:
        handler = type("Handler", (_Handler,), {"double": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        # A short poll interval: shutdown() waits up to one interval.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="ollama-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases answers that are still waiting out their delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> OllamaDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the double first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what the tests read --------------------------------------------------------------

    @property
    def chats(self) -> list[Received]:
        """The /api/chat requests, in the order received."""
        with self._lock:
            return [r for r in self.received if r.path == "/api/chat"]

    @property
    def prompts(self) -> list[str]:
        """The text of every chat and generate request, in the order received."""
        with self._lock:
            return [r.text for r in self.received if r.path in ("/api/chat", "/api/generate")]

    # -- used by the handler --------------------------------------------------------------

    def _record(self, method: str, path: str, body: dict[str, Any]) -> None:
        with self._lock:
            self.received.append(Received(method, path, body))

    def _next_answer(self, body: dict[str, Any]) -> Reply | None:
        with self._lock:
            if not self._answers:
                return None
            answer = self._answers.pop(0)
        if callable(answer):
            answer = answer(body)
        return answer if isinstance(answer, Reply) else Reply(answer, self.delay_s)

    def _wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on a slow answer closes the socket; that is expected.
        pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    double: OllamaDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.double._record("GET", self.path, {})
        if self.path == "/api/tags":
            self._json(200, {"models": [_model_entry(name) for name in self.double.models]})
        elif self.path in ("/", "/api/version"):
            self._json(200, {"version": "0.0.0-double"})
        else:
            self._json(404, {"error": "404 page not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._json(400, {"error": "invalid JSON body"})
            return
        self.double._record("POST", self.path, body)
        model = str(body.get("model", ""))
        if self.path not in ("/api/chat", "/api/generate", "/api/show"):
            self._json(404, {"error": "404 page not found"})
        elif model not in self.double.models:
            self._json(404, {"error": f"model '{model}' not found"})
        elif self.path == "/api/show":
            self._json(200, {
                "modelfile": f"FROM {model}", "parameters": "", "template": "{{ .Prompt }}",
                "details": _model_entry(model)["details"], "model_info": {},
                "capabilities": ["completion"], "modified_at": _now(),
            })
        else:
            self._answer(model, body)

    def _answer(self, model: str, body: dict[str, Any]) -> None:
        reply = self.double._next_answer(body)
        if reply is None:
            self._json(500, {"error": "the Ollama test double has no scripted answer left"})
            return
        if reply.delay_s:
            self.double._wait(reply.delay_s)
        done = {
            "model": model, "created_at": _now(), "done": True, "done_reason": "stop",
            "total_duration": 1_000_000, "load_duration": 1000, "prompt_eval_count": 1,
            "prompt_eval_duration": 1000, "eval_count": 1, "eval_duration": 1000,
        }
        if self.path == "/api/chat":
            done["message"] = {"role": "assistant", "content": reply.content}
        else:
            done["response"] = reply.content
            done["context"] = []
        if body.get("stream", True):  # Ollama streams unless told not to
            self._send(200, "application/x-ndjson", json.dumps(done).encode() + b"\n")
        else:
            self._json(200, done)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, "application/json; charset=utf-8", json.dumps(payload).encode())

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name, "model": name, "modified_at": _now(), "size": 1,
        "digest": "0" * 64,
        "details": {"parent_model": "", "format": "gguf", "family": "double",
                    "families": ["double"], "parameter_size": "0B",
                    "quantization_level": "none"},
    }


__all__ = ["OllamaDouble", "Reply", "Received"]
