"""A real HTTP server on loopback that speaks the OpenAI chat-completions API and misbehaves on purpose.

    python tests/fakeopenai.py --port 8123 --latency-s 0.1          # serve until Ctrl-C (benchmarks use this)
    curl -s localhost:8123/v1/chat/completions -d '{"model":"m","messages":[{"role":"user","content":"Title: A\\nDescription: B."}]}'

It answers `POST /v1/chat/completions` with a grounded CoT JSON built from the `Title:` / `Description:` lines
of the last user message (the layout of `prodtune.prompts.COT_USER_TEMPLATE`), to any client (the `openai`
package in stage 02, plain `httpx` in benchmarks/bench_cot.py's reference loop). Faults are injected per product,
reproducibly (a seeded hash of the product and its request number, so the same request gets the same fault
whatever the concurrency): HTTP 429 (with Retry-After), 500 (whose body echoes the Authorization header, to
prove the client masks the key), slow answers beyond the client's timeout, 200s with a body that is not JSON,
truncated JSON in the message, and schema-violating objects. After `max_faults_per_product` faults a product
always gets a good answer, so a client that retries enough loses nothing. Every request is logged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "slow", "bad_body", "malformed", "schema")


def _unit(*parts: Any) -> float:
    d = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64


def grounded_answer(title: str, description: str) -> dict[str, str]:
    """A row that passes prodtune's gates: its facts are the description's own first sentences."""
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", description.strip()) if s.strip()] or [description]
    first = sents[0]
    words = first.split()
    # Keep the answer well under the whole description, so the "copies the description" gate stays quiet.
    limit = max(6, int(len(description.split()) * 0.5))
    answer = " ".join(words[:limit]).rstrip(".,;:") + "."
    return {
        "Question": f"Could you tell me what matters most about the {title}?",
        "Complex_CoT": (f"The shopper asks about the {title}. I can use only the description. It says: {first} "
                        + (f"It also says: {sents[1]} " if len(sents) > 1 else "")
                        + "These facts answer the question without adding anything else."),
        "Response": f"Good question. {answer}",
    }


class _Server(ThreadingHTTPServer):
    # The stdlib default listen backlog is 5: 16 clients connecting at once would see dropped SYNs (1 s
    # retransmits) and resets, which real API servers do not cause.
    request_queue_size = 256


class FakeOpenAI:
    """The server. Use as a context manager: `with FakeOpenAI(faults={"429": 0.2}) as srv: srv.base_url`.

    Args:
        faults: probability of each fault (keys in `FAULTS`) per request, for requests of a product before it
            has had `max_faults_per_product` faults.
        max_faults_per_product: after this many faults a product's requests succeed.
        latency_s: fixed delay before every answer (benchmarks).
        slow_s: delay of a `slow` fault (make it longer than the client's timeout).
        retry_after: the value of the `retry_after_header` sent with 429s (None: no header).
        retry_after_header: `Retry-After` (seconds or an HTTP date) or `retry-after-ms` (OpenAI's own).
        always_invalid: titles that always get a schema-violating answer (to test rejection after re-asks).
        reject_json_schema: answer 400 to `response_format: json_schema` (an old server), to test the fallback.
        require_key: answer 401 unless `Authorization: Bearer <require_key>`.
        seed: seeds the fault draws.
        port: 0 picks a free port.
    """

    def __init__(
        self,
        faults: dict[str, float] | None = None,
        max_faults_per_product: int = 2,
        latency_s: float = 0.0,
        slow_s: float = 2.0,
        retry_after: str | None = "0",
        retry_after_header: str = "Retry-After",
        always_invalid: set[str] | frozenset[str] = frozenset(),
        reject_json_schema: bool = False,
        require_key: str | None = None,
        seed: int = 0,
        port: int = 0,
    ):
        unknown = set(faults or {}) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known {FAULTS}")
        self.faults = dict(faults or {})
        self.max_faults = max_faults_per_product
        self.latency_s, self.slow_s, self.retry_after = latency_s, slow_s, retry_after
        self.retry_after_header = retry_after_header
        self.always_invalid = set(always_invalid)
        self.reject_json_schema = reject_json_schema
        self.require_key = require_key
        self.seed = seed
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []  # one entry per request: product, n, fault, t, auth, response_format
        self.injected: Counter = Counter()
        self._per_product: Counter = Counter()
        self._faults_done: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd = _Server(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def products_requested(self) -> Counter:
        """Requests per product title."""
        return Counter(r["title"] for r in self.requests)

    def _decide(self, title: str, description: str) -> tuple[str | None, int]:
        key = f"{title}\x00{description}"
        with self.lock:
            n = self._per_product[key]
            self._per_product[key] += 1
            if title in self.always_invalid:
                return "schema", n
            if self._faults_done[key] >= self.max_faults:
                return None, n
            u, acc = _unit(self.seed, key, n), 0.0
            for f in FAULTS:
                acc += self.faults.get(f, 0.0)
                if u < acc:
                    self._faults_done[key] += 1
                    self.injected[f] += 1
                    return f, n
        return None, n

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real API servers do
            # TCP_NODELAY, as uvicorn sets: headers and body go out in two writes, and with Nagle on, the body
            # would wait for the client's delayed ACK (~40 ms per request on Linux).
            disable_nagle_algorithm = True

            def log_message(self, *a: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes | dict, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): that is the point of a slow answer

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                t = time.monotonic()
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization") or ""
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    req = json.loads(raw)
                    msgs = req["messages"]
                    user = [m["content"] for m in msgs if m.get("role") == "user"][-1]
                    model = req["model"]
                except (ValueError, KeyError, IndexError, TypeError):
                    return self._send(400, {"error": {"message": "invalid request body"}})
                if srv.require_key is not None and auth != f"Bearer {srv.require_key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided"}})
                rf = req.get("response_format") or {}
                if srv.reject_json_schema and rf.get("type") == "json_schema":
                    with srv.lock:
                        srv.requests.append({"title": None, "n": None, "fault": "400", "t": t, "auth": auth,
                                             "response_format": "json_schema", "seed": req.get("seed")})
                    return self._send(400, {"error": {"message": "response_format json_schema is not supported"}})
                m_t = re.search(r"^Title: (.*)$", user, re.M)
                m_d = re.search(r"^Description: (.*)$", user, re.M)
                title, desc = (m_t.group(1) if m_t else ""), (m_d.group(1) if m_d else user)
                fault, n = srv._decide(title, desc)
                with srv.lock:
                    srv.requests.append({"title": title, "n": n, "fault": fault, "t": t, "auth": auth,
                                         "response_format": rf.get("type"), "seed": req.get("seed")})
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                try:
                    if srv.latency_s:
                        time.sleep(srv.latency_s)
                    if fault == "429":
                        hdr = {srv.retry_after_header: srv.retry_after} if srv.retry_after is not None else {}
                        return self._send(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}}, hdr)
                    if fault == "500":
                        # Some proxies echo request headers in error pages: the client must never let that leak.
                        return self._send(500, {"error": {"message": f"internal error (request had {auth})"}})
                    if fault == "bad_body":
                        return self._send(200, b"<html>502 Bad Gateway</html>")
                    if fault == "slow":
                        time.sleep(srv.slow_s)
                    if fault == "malformed":
                        content = '{"Question": "Is it any good?", "Complex_CoT": "Because the descr'
                    elif fault == "schema":
                        content = json.dumps({"question": f"About the {title}?", "answer": "It is great."})
                    else:
                        content = json.dumps(grounded_answer(title, desc))
                    return self._send(200, {
                        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": len(raw) // 4, "completion_tokens": len(content) // 4,
                                  "total_tokens": (len(raw) + len(content)) // 4},
                    })
                finally:
                    with srv.lock:
                        srv.in_flight -= 1

        return Handler


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-s", type=float, default=0.0)
    ap.add_argument("--fault", action="append", default=[], metavar="NAME=P", help=f"fault rate, NAME in {FAULTS}")
    args = ap.parse_args()
    faults = {k: float(v) for k, v in (f.split("=", 1) for f in args.fault)}
    with FakeOpenAI(faults=faults, latency_s=args.latency_s, port=args.port) as s:
        print(s.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
