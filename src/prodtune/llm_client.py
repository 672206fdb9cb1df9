"""A small async client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, Ollama, llama.cpp).

    python -c "import asyncio; from prodtune.llm_client import ChatClient; print(ChatClient('http://127.0.0.1:8000/v1', 'm'))"

Only `httpx` is needed (no `openai` package). The client sends `POST {base_url}/chat/completions`, keeps at
most `concurrency` requests in flight, and retries 408/409/429/5xx answers, timeouts and dropped connections
with exponential backoff and jitter, waiting at least what a `Retry-After` header asks. 401/403 (`AuthError`)
and 404 (`FatalError`: wrong URL or model name) stop the run; other 4xx fail that request (`RequestFailed`),
marked retryable so that a later run, with the settings fixed, tries it again. The API key is read from an
environment variable by the caller, sent only in the `Authorization` header and masked (`redact`) in every
message this module produces, so it cannot reach logs, exceptions or files.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from prodtune.io import log

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529})


class FatalError(RuntimeError):
    """A configuration error every request would hit (bad key, wrong URL or model): the whole run stops."""


class AuthError(FatalError):
    """The endpoint refused the credentials (401/403)."""


class RequestFailed(RuntimeError):
    """One request failed for good: a non-retryable status, or retries exhausted.

    Attributes:
        reason: short machine-readable reason (`http_400`, `retries_exhausted:429`, ...).
        retryable: True when a later run may succeed (transient errors that outlasted the retries).
    """

    def __init__(self, reason: str, detail: str = "", retryable: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.retryable = reason, detail, retryable


@dataclass
class RetryPolicy:
    """How hard to retry one request. Delays: `min(max_s, base_s * 2**attempt)`, jittered to [50%, 100%]."""

    max_retries: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 300.0  # a Retry-After above this is capped (a misconfigured proxy must not stall a run)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt + 1`.

        Equal jitter keeps clients that failed together from retrying together while still backing off;
        a server's `Retry-After` is a lower bound, since retrying earlier only earns another 429.
        """
        cap = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        wait = rng.uniform(cap / 2, cap)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after_s))
        return wait


@dataclass
class CallStats:
    """What one logical call (with its retries) cost: attempts, retry reasons, seconds, token usage."""

    attempts: int = 0
    retries: Counter = field(default_factory=Counter)
    waited_s: float = 0.0
    seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "retries": dict(self.retries),
            "waited_s": round(self.waited_s, 3),
            "seconds": round(self.seconds, 3),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds (`"2"`, `"0.5"`) or an HTTP date; None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def redact(text: str, secret: str | None) -> str:
    """Replace every occurrence of `secret` in `text` by `***` (no-op for empty secrets)."""
    if secret and len(secret) >= 4 and text:
        return text.replace(secret, "***")
    return text


class ChatClient:
    """Async OpenAI-compatible chat client with a concurrency limit, timeouts and retries.

    Use it as an async context manager:

        async with ChatClient("http://127.0.0.1:8000/v1", "my-model", api_key=key, concurrency=16) as c:
            text, stats = await c.complete([{"role": "user", "content": "hi"}])

    Args:
        base_url: the API root, e.g. `https://api.openai.com/v1` or `http://localhost:11434/v1`.
        model: the model name sent with each request.
        api_key: bearer token, or None for local servers that need none (vLLM, Ollama, llama.cpp).
        concurrency: most requests in flight at once.
        timeout_s: limit for one request (connect, read, write and pool wait each).
        policy: retry policy.
        seed: seeds the jitter RNG (reproducible retry timings in tests).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        policy: RetryPolicy | None = None,
        seed: int = 0,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._key = api_key or None
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.policy = policy or RetryPolicy()
        self._rng = random.Random(seed)
        self._sem: asyncio.Semaphore | None = None
        self._client: httpx.AsyncClient | None = None
        self.totals = CallStats()  # summed over every call of this client

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency}, key={'set' if self._key else 'none'})"

    async def __aenter__(self) -> "ChatClient":
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self._sem = asyncio.Semaphore(self.concurrency)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def redact(self, text: str) -> str:
        """Mask this client's key in `text`."""
        return redact(text, self._key)

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.7,
        max_tokens: int = 512,
        response_format: dict | None = None,
        seed: int | None = None,
        stats: CallStats | None = None,
    ) -> tuple[dict[str, Any], CallStats]:
        """Send one chat request, retrying transient failures; return the first choice and the call's stats.

        Args:
            messages: chat messages.
            temperature: sampling temperature.
            max_tokens: completion token limit.
            response_format: e.g. `{"type": "json_schema", "json_schema": {...}}`; None sends none.
            seed: per-request seed (OpenAI and vLLM honour it; others ignore it).
            stats: accumulate into this object (one product's several calls), else a new one.

        Returns:
            `(choice, stats)` where choice is `{"content": str, "finish_reason": str | None, "refusal": str | None}`.

        Raises:
            AuthError: 401/403.
            FatalError: 404.
            RequestFailed: other 4xx, or retries exhausted (also on 200s whose body is no chat completion).
        """
        assert self._client is not None and self._sem is not None, "use `async with ChatClient(...)`"
        st = stats if stats is not None else CallStats()
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if response_format is not None:
            body["response_format"] = response_format
        if seed is not None:
            body["seed"] = seed
        t0 = time.perf_counter()
        last = ""
        try:
            for attempt in range(self.policy.max_retries + 1):
                retry_after: float | None = None
                async with self._sem:  # the limit covers requests in flight, not backoff sleeps
                    st.attempts += 1
                    self.totals.attempts += 1
                    try:
                        r = await self._client.post(self.url, json=body)
                    except httpx.TimeoutException:
                        last, detail = "timeout", f"no answer within {self.timeout_s}s"
                    except httpx.TransportError as e:
                        last, detail = "connection", type(e).__name__
                    else:
                        if r.status_code == 200:
                            choice = self._choice(r, st)
                            if choice is not None:
                                return choice, st
                            last, detail = "bad_body", r.text[:200]
                        elif r.status_code in (401, 403):
                            raise AuthError(self.redact(f"{self.url}: HTTP {r.status_code}: {r.text[:300]}"))
                        elif r.status_code == 404:
                            raise FatalError(self.redact(f"{self.url}: HTTP 404 (wrong base URL or model {self.model!r}?): {r.text[:300]}"))
                        elif r.status_code in RETRY_STATUS:
                            last, detail = str(r.status_code), r.text[:200]
                            retry_after = parse_retry_after(r.headers.get("retry-after"))
                        else:
                            raise RequestFailed(f"http_{r.status_code}", self.redact(r.text[:300]), retryable=True)
                if attempt == self.policy.max_retries:
                    break
                st.retries[last] += 1
                self.totals.retries[last] += 1
                wait = self.policy.delay(attempt, retry_after, self._rng)
                st.waited_s += wait
                log.debug("retry %d after %s (%s), waiting %.2fs", attempt + 1, last, self.redact(detail), wait)
                await asyncio.sleep(wait)
            raise RequestFailed(f"retries_exhausted:{last}", self.redact(detail), retryable=True)
        finally:
            st.seconds += time.perf_counter() - t0

    def _choice(self, r: httpx.Response, st: CallStats) -> dict[str, Any] | None:
        """The first choice of a 200 answer, or None when the body is not a chat completion (retried)."""
        try:
            data = r.json()
            msg = data["choices"][0]["message"]
            choice = {
                "content": msg.get("content") or "",
                "finish_reason": data["choices"][0].get("finish_reason"),
                "refusal": msg.get("refusal"),
            }
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None
        usage = data.get("usage") or {}
        if isinstance(usage, dict):
            for k in ("prompt_tokens", "completion_tokens"):
                v = usage.get(k)
                if isinstance(v, int):
                    setattr(st, k, getattr(st, k) + v)
                    setattr(self.totals, k, getattr(self.totals, k) + v)
        return choice
