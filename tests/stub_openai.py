"""A local, scriptable OpenAI-compatible HTTP server for integration tests.

Standard library only.  It lets the *real* clients (``openai``,
``langchain-openai``, ``llama-index-llms-openai`` ...) talk HTTP to
``127.0.0.1`` while every response -- content, tool calls, served model name,
status code and, above all, token usage -- is scripted exactly.

Usage::

    with StubOpenAI() as stub:
        stub.enqueue(StubReply("hello", usage=StubUsage(12, 3, cached_tokens=4)))
        llm = ChatOpenAI(base_url=stub.base_url, api_key="sk-test", max_retries=0)
        llm.invoke("hi")
        assert stub.count() == 1

Endpoints (everything else answers 404 with an OpenAI-style error body):

* ``POST /v1/chat/completions`` -- non-streaming and streaming (SSE).
* ``POST /v1/completions`` -- legacy text completions, same rules.
* ``POST /v1/embeddings`` -- deterministic 8-dim vectors, ``float`` or
  ``base64`` encoding (the ``openai`` client asks for base64 by default).
* ``POST /v1/messages`` -- a minimal Anthropic Messages endpoint (what
  ``anthropic`` / ``langchain-anthropic`` send; point them at ``url``, without
  ``/v1``), non-streaming and streaming, text replies only.  It takes its
  reply from the same queue; ``StubReply.raw_usage`` is sent verbatim as
  Anthropic's ``usage`` (``input_tokens`` *excluding* cache reads and writes,
  ``cache_read_input_tokens``, ``cache_creation_input_tokens``,
  ``cache_creation.{ephemeral_5m_input_tokens,ephemeral_1h_input_tokens}``,
  ``server_tool_use.web_search_requests``, ``service_tier``); else ``usage``
  becomes ``{"input_tokens": prompt_tokens, "output_tokens": completion_tokens}``.

Chat and legacy completions take the next reply from one FIFO queue shared by
both endpoints (``enqueue``); when the queue is empty ``responder(request)`` is
called, and when that is ``None`` the default ``StubReply()`` is served.
Embeddings never touch the queue; their usage comes from ``embedding_usage``.

Streaming follows OpenAI: the usage chunk (``"choices": []``) is sent only
when the request has ``stream_options.include_usage`` true (override with
``StubReply.stream_usage``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["EMBEDDING_DIM", "StubOpenAI", "StubReply", "StubUsage", "embedding_vector"]

EMBEDDING_DIM = 8


@dataclass
class StubUsage:
    """Token usage reported by a scripted reply (``total_tokens`` is computed)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


def _default_usage() -> StubUsage:
    return StubUsage(10, 5)


@dataclass
class StubReply:
    """One scripted response for ``/chat/completions`` or ``/completions``.

    * ``content`` -- assistant text (``None`` -> JSON ``null``; an empty string
      together with tool calls is also sent as ``null``, like OpenAI does).
    * ``tool_calls`` -- ``(name, arguments)`` or ``(name, arguments, id)``
      tuples; ids default to ``call_<n>`` (a per-server counter, reset by
      ``StubOpenAI.reset()``).
    * ``usage`` -- ``None`` means the response carries no usage at all.
    * ``raw_usage`` -- when set, sent verbatim as ``"usage"`` (overrides
      ``usage``); use it for malformed-provider cases.
    * ``model`` -- served model name echoed in ``"model"`` (default: the
      request's model).
    * ``status`` -- non-200 returns an OpenAI-style ``{"error": {...}}`` body.
    * ``delay_s`` -- sleep before answering.
    * ``finish_reason`` -- default ``"tool_calls"`` if tool calls else ``"stop"``.
    * ``stream_usage`` -- streaming only: ``None`` follows the request's
      ``stream_options.include_usage``; ``True``/``False`` force the usage
      chunk on/off.
    """

    content: str | None = "ok"
    tool_calls: list[tuple[Any, ...]] = field(default_factory=list)
    usage: StubUsage | None = field(default_factory=_default_usage)
    model: str | None = None
    status: int = 200
    delay_s: float = 0.0
    finish_reason: str | None = None
    raw_usage: dict[str, Any] | None = None
    stream_usage: bool | None = None
    error_message: str = "stub error"
    service_tier: str | None = None
    """Sent as the response's ``service_tier`` (OpenAI chat completions) when set."""

    def resolved_finish_reason(self) -> str:
        if self.finish_reason is not None:
            return self.finish_reason
        return "tool_calls" if self.tool_calls else "stop"

    def usage_payload(self) -> dict[str, Any] | None:
        if self.raw_usage is not None:
            return self.raw_usage
        if self.usage is not None:
            return self.usage.to_openai()
        return None

    def anthropic_usage(self) -> dict[str, Any]:
        if self.raw_usage is not None:
            return self.raw_usage
        u = self.usage or StubUsage(0, 0)
        return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}


def embedding_vector(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """Deterministic vector served for ``text``.

    Values are multiples of 1/128 in [-1, 1), hence exactly representable in
    float32 -- the base64 (float32) and float encodings decode identically.
    """
    out: list[float] = []
    counter = 0
    while len(out) < dim:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend(b / 128.0 - 1.0 for b in digest)
        counter += 1
    return out[:dim]


def _default_embedding_usage(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def _split(text: str, parts: int = 3) -> list[str]:
    """Split ``text`` into up to ``parts`` non-empty pieces."""
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # many concurrent clients in the concurrency tests
    stub: StubOpenAI

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping keep-alive connections (e.g. at interpreter exit)
        # are normal; only report real handler bugs.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "StubOpenAI/1.0"
    disable_nagle_algorithm = True
    server: _Server

    # -- plumbing -----------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error_json(self, status: int, message: str) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        self._send_json(
            status,
            {
                "error": {
                    "message": message,
                    "type": phrase.lower().replace(" ", "_"),
                    "param": None,
                    "code": str(status),
                }
            },
        )

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _sse(self, payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        raw = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(raw):X}\r\n".encode() + raw + b"\r\n")

    def _end_sse(self) -> None:
        self._sse("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- dispatch -----------------------------------------------------------
    def do_GET(self) -> None:
        self._read_body()
        self._send_error_json(404, f"Unknown path: GET {self.path}")

    do_DELETE = do_PUT = do_PATCH = do_GET

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            self._send_error_json(400, "Invalid JSON body")
            return
        if not isinstance(body, dict):
            body = {"_body": body}
        stub = self.server.stub
        record = dict(body)
        record["path"] = path
        stub._record(record)
        try:
            if path.endswith("/completions"):  # chat or legacy
                try:
                    reply = stub._next_reply(record)
                except Exception as exc:
                    self._send_error_json(500, f"stub responder failed: {exc!r}")
                    return
                if path.endswith("/chat/completions"):
                    self._chat(body, reply)
                else:
                    self._completion(body, reply)
            elif path.endswith("/embeddings"):
                self._embeddings(body, stub)
            elif path.endswith("/v1/messages"):
                try:
                    reply = stub._next_reply(record)
                except Exception as exc:
                    self._send_error_json(500, f"stub responder failed: {exc!r}")
                    return
                self._messages(body, reply)
            else:
                self._send_error_json(404, f"Unknown path: POST {path}")
        except (BrokenPipeError, ConnectionResetError):  # client went away
            self.close_connection = True

    # -- endpoints ----------------------------------------------------------
    def _prelude(self, reply: StubReply) -> bool:
        """Sleep/error handling common to both generation endpoints."""
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.status != 200:
            self._send_error_json(reply.status, reply.error_message)
            return False
        return True

    @staticmethod
    def _wants_stream_usage(body: dict[str, Any], reply: StubReply) -> bool:
        if reply.stream_usage is not None:
            return reply.stream_usage
        opts = body.get("stream_options") or {}
        return bool(isinstance(opts, dict) and opts.get("include_usage"))

    def _chat(self, body: dict[str, Any], reply: StubReply) -> None:
        if not self._prelude(reply):
            return
        stub = self.server.stub
        model = reply.model or body.get("model") or "stub-model"
        rid = f"chatcmpl-stub{stub._next_id()}"
        created = int(time.time())
        tool_calls = [
            {
                "id": tc[2] if len(tc) > 2 else f"call_{stub._next_call_id()}",
                "type": "function",
                "function": {"name": tc[0], "arguments": json.dumps(tc[1])},
            }
            for tc in reply.tool_calls
        ]
        content = reply.content
        if tool_calls and content == "":
            content = None
        finish = reply.resolved_finish_reason()
        usage = reply.usage_payload()

        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": content,
                "refusal": None,
            }
            if tool_calls:
                message["tool_calls"] = tool_calls
            payload: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_stub",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
            if usage is not None:
                payload["usage"] = usage
            if reply.service_tier is not None:
                payload["service_tier"] = reply.service_tier
            self._send_json(200, payload)
            return

        send_usage = self._wants_stream_usage(body, reply) and usage is not None

        def chunk(
            delta: dict[str, Any], finish_reason: str | None = None
        ) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_stub",
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if send_usage:
                c["usage"] = None
            return c

        self._start_sse()
        self._sse(chunk({"role": "assistant", "content": "", "refusal": None}))
        for piece in _split(content or ""):
            self._sse(chunk({"content": piece}))
        for index, tc in enumerate(tool_calls):
            head = {
                "index": index,
                "id": tc["id"],
                "type": "function",
                "function": {"name": tc["function"]["name"], "arguments": ""},
            }
            self._sse(chunk({"tool_calls": [head]}))
            for piece in _split(tc["function"]["arguments"]):
                self._sse(
                    chunk(
                        {
                            "tool_calls": [
                                {"index": index, "function": {"arguments": piece}}
                            ]
                        }
                    )
                )
        self._sse(chunk({}, finish))
        if send_usage:
            self._sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_stub",
                    "choices": [],
                    "usage": usage,
                }
            )
        self._end_sse()

    def _messages(self, body: dict[str, Any], reply: StubReply) -> None:
        """Anthropic Messages: a text reply, its usage as scripted (see the module docstring)."""
        if not self._prelude(reply):
            return
        stub = self.server.stub
        model = reply.model or body.get("model") or "stub-model"
        rid = f"msg_stub{stub._next_id()}"
        text = reply.content or ""
        usage = reply.anthropic_usage()
        stop = reply.finish_reason or "end_turn"
        if not body.get("stream"):
            self._send_json(200, {
                "id": rid, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": stop, "stop_sequence": None, "usage": usage,
            })
            return
        # Anthropic's stream: message_start carries the input counts, message_delta the final usage.
        start_usage = {k: v for k, v in usage.items() if k != "output_tokens"}
        start_usage["output_tokens"] = 1
        self._start_sse()
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": {
                "id": rid, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        ]
        for piece in _split(text):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": piece}}))
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": usage}),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            raw = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(f"{len(raw):X}\r\n".encode() + raw + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _completion(self, body: dict[str, Any], reply: StubReply) -> None:
        if not self._prelude(reply):
            return
        stub = self.server.stub
        model = reply.model or body.get("model") or "stub-model"
        rid = f"cmpl-stub{stub._next_id()}"
        created = int(time.time())
        text = reply.content or ""
        finish = reply.finish_reason or "stop"
        usage = reply.usage_payload()

        if not body.get("stream"):
            payload: dict[str, Any] = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "text": text,
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
            if usage is not None:
                payload["usage"] = usage
            self._send_json(200, payload)
            return

        send_usage = self._wants_stream_usage(body, reply) and usage is not None

        def chunk(piece: str, finish_reason: str | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "text": piece,
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if send_usage:
                c["usage"] = None
            return c

        self._start_sse()
        for piece in _split(text):
            self._sse(chunk(piece))
        self._sse(chunk("", finish))
        if send_usage:
            self._sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        self._end_sse()

    def _embeddings(self, body: dict[str, Any], stub: StubOpenAI) -> None:
        raw_input = body.get("input", [])
        # str | list[str] | list[int] (tokens) | list[list[int]]
        if isinstance(raw_input, str) or (
            isinstance(raw_input, list) and raw_input and isinstance(raw_input[0], int)
        ):
            raw_input = [raw_input]
        texts = [
            x if isinstance(x, str) else " ".join(str(t) for t in x) for x in raw_input
        ]
        dim = int(body.get("dimensions") or EMBEDDING_DIM)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = embedding_vector(text, dim)
            emb: Any = (
                base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
                if as_base64
                else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        counter = stub.embedding_usage or _default_embedding_usage
        tokens = int(counter(texts))
        self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model") or "stub-embedding",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


class StubOpenAI:
    """Threaded OpenAI-compatible stub server bound to ``127.0.0.1``.

    Attributes:
        responder: ``Callable[[dict], StubReply]`` used when the queue is empty
            (receives the request record, see ``requests``).
        embedding_usage: ``Callable[[list[str]], int]`` giving ``prompt_tokens``
            for ``/embeddings`` (default: total whitespace-split word count).
        requests: every POST received, in order -- the parsed JSON body plus a
            ``"path"`` key (e.g. ``"/v1/chat/completions"``).  Read it via
            ``requests`` (a snapshot copy) or ``count()``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._queue: deque[StubReply] = deque()
        self._requests: list[dict[str, Any]] = []
        self._id_counter = 0
        self._call_counter = 0
        self.responder: Callable[[dict[str, Any]], StubReply] | None = None
        self.embedding_usage: Callable[[list[str]], int] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> Self:
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), _Handler)
        server.stub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="stub-openai",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("StubOpenAI is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no ``/v1``)."""
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1`` -- pass as ``base_url`` / ``api_base``."""
        return f"{self.url}/v1"

    # -- scripting ----------------------------------------------------------
    def enqueue(self, *replies: StubReply) -> None:
        """Append scripted replies (FIFO, shared by chat and legacy completions)."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def pending(self) -> int:
        """Number of queued replies not yet served."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    def count(self, path_suffix: str = "/chat/completions") -> int:
        with self._lock:
            return sum(1 for r in self._requests if r["path"].endswith(path_suffix))

    def last_request(self, path_suffix: str = "") -> dict[str, Any]:
        with self._lock:
            for r in reversed(self._requests):
                if r["path"].endswith(path_suffix):
                    return r
        raise LookupError(f"no request matching {path_suffix!r}")

    def reset(self) -> None:
        """Clear the queue, responder, embedding_usage, requests and id counters."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self._id_counter = 0
            self._call_counter = 0
            self.responder = None
            self.embedding_usage = None

    # -- internals (called from handler threads) -----------------------------
    def _record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(record)

    def _next_reply(self, record: dict[str, Any]) -> StubReply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            responder = self.responder
        return responder(record) if responder is not None else StubReply()

    def _next_id(self) -> int:
        with self._lock:
            self._id_counter += 1
            return self._id_counter

    def _next_call_id(self) -> int:
        with self._lock:
            self._call_counter += 1
            return self._call_counter
