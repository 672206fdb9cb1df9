"""Stage 02's `openai` backend: any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, llama.cpp) through the
official `openai` client.

    OPENAI_API_KEY=... prodtune cot --backend openai --model gpt-4o-mini --n 2000 --concurrency 16
    prodtune cot --backend openai --base_url http://localhost:11434/v1 --model qwen2.5:7b   # Ollama, no key

The client does the transport work: `max_retries` retries of 408/409/429/5xx answers, timeouts and dropped
connections with exponential backoff and jitter, waiting what a `Retry-After`/`retry-after-ms` header asks
(up to 120 s; a longer one is not retried, and the product is left for a later run); `timeout` bounds each
request. This module adds what is ours: `concurrency` requests in flight, `response_format` (json_schema,
falling back to json_object, then none, when a server refuses it), pydantic validation of each answer with
re-asks of invalid ones, per-product counts of every retry by cause, and the key kept out of rows, stats,
logs and exceptions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import os
import re
import time
from collections import Counter
from typing import Any

import httpx2
import openai

from prodtune import prompts
from prodtune.cot.backends import Backend, GenResult, OnResult
from prodtune.cot.config import CoTConfig, parse_answer, response_format
from prodtune.cot.products import Item, stable_hash
from prodtune.io import UserError, log

NO_KEY = "no-key"  # the client insists on a key; local servers (vLLM, Ollama, llama.cpp) ignore this one


class NotACompletion(Exception):
    """A 200 answer whose body is no chat completion: asked again, like a transport fault, up to `max_retries` times."""


class EndpointError(UserError):
    """The endpoint refused the key (401/403) or does not exist (404: wrong URL or model): every request would
    fail the same way, so the run stops (`prodtune cot` prints the message and exits 2). It never holds the key."""


def redact(text: str, secret: str | None) -> str:
    """Replace every occurrence of `secret` in `text` by `***` (no-op for empty or very short secrets)."""
    if secret and len(secret) >= 4 and text:
        return text.replace(secret, "***")
    return text


def run_coro(coro: Any) -> Any:
    """Run a coroutine from sync code, also inside Jupyter (whose event loop already runs in this thread).

    There it runs on a fresh loop in a worker thread; an interrupt (Ctrl-C, the notebook's stop button) cancels
    that loop's task, so requests stop and the rows written so far stay for the next run to resume from.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def runner() -> Any:
        loop = asyncio.new_event_loop()
        try:
            box["task"], box["loop"] = loop.create_task(coro), loop
            return loop.run_until_complete(box["task"])
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(runner)
        try:
            return fut.result()
        except KeyboardInterrupt:
            if "task" in box:
                box["loop"].call_soon_threadsafe(box["task"].cancel)
            raise


# The outcomes of the HTTP attempts of the product a worker task is on ("200", "429", "timeout", ...). The client
# retries inside one `create()` call; the transport below sees every attempt, in the task that made the call.
_ATTEMPTS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("cot_attempts", default=None)


class _AttemptLog(httpx2.AsyncBaseTransport):
    """Wraps the client's transport to record each attempt's outcome and log failed answers with the key masked."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, key: str | None):
        self.inner, self.key = inner, key

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        rec = _ATTEMPTS.get()
        rec = rec if rec is not None else []
        try:
            resp = await self.inner.handle_async_request(request)
        except httpx2.TimeoutException:
            rec.append("timeout")
            raise
        except httpx2.TransportError as e:
            rec.append("connection")
            log.debug("cot openai: %s: %s", request.url, type(e).__name__)
            raise
        rec.append(str(resp.status_code))
        if resp.status_code != 200:
            await resp.aread()  # small error bodies; the client reads the cached copy
            log.debug("cot openai: HTTP %d from %s: %s", resp.status_code, request.url,
                      redact(resp.content[:300].decode("utf-8", "replace"), self.key))
        return resp

    async def aclose(self) -> None:
        await self.inner.aclose()


def _retryable_status(status: int) -> bool:
    """The statuses the `openai` client retries by itself."""
    return status in (408, 409, 429) or status >= 500


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat endpoint; concurrent, retried by the client, answers validated with pydantic.

    The key is read from the environment variable `cfg.api_key_env` when the backend is made and never stored
    in the config, the rows, stats, the card or logs (messages pass through `redact`). Without a key the
    requests carry a placeholder, which local servers (vLLM, Ollama, llama.cpp) accept.
    """

    name = "openai"

    def __init__(self, cfg: CoTConfig):
        super().__init__(cfg)
        self.rf_mode = cfg.structured_output
        self.reached = False  # has any request of this run had an HTTP answer? (if none, a refused connection is fatal)
        self.key = os.environ.get(cfg.api_key_env) or None
        if self.key is None:
            log.warning("cot openai: $%s is not set; sending requests without a real key (fine for local servers)",
                        cfg.api_key_env)

    def run_info(self) -> dict[str, Any]:
        return {"structured_output": self.rf_mode}

    def client(self) -> openai.AsyncOpenAI:
        """An `openai.AsyncOpenAI` with this config's retries, timeout and connection limit."""
        cfg = self.cfg
        limits = httpx2.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        transport = _AttemptLog(httpx2.AsyncHTTPTransport(limits=limits), self.key)
        return openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=self.key or NO_KEY, max_retries=cfg.max_retries, timeout=cfg.timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(transport=transport),
        )

    def run(self, items: list[Item], on_result: OnResult) -> None:
        run_coro(self._run(items, on_result))

    async def _run(self, items: list[Item], on_result: OnResult) -> None:
        todo = iter(items)
        async with self.client() as client:

            async def worker() -> None:
                for it in todo:  # a shared iterator: each item goes to exactly one worker
                    on_result(await self._one(client, it))

            # `concurrency` workers, one request each at a time: the limit covers requests in flight.
            tasks = [asyncio.create_task(worker()) for _ in range(min(self.cfg.concurrency, max(1, len(items))))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _ask(self, client: openai.AsyncOpenAI, msgs: list[dict[str, str]], mode: str, seed: int,
                   meta: dict[str, Any]) -> tuple[str, str | None, str | None]:
        """One chat completion (the client retrying transport faults): `(content, refusal, finish_reason)`.

        Adds the call's attempts, retries by cause and token usage to `meta`.

        Raises:
            NotACompletion: a 200 whose body is no chat completion (a proxy's HTML page, an empty object).
            openai.APIStatusError, openai.APIConnectionError: as the client raises them, after its retries.
        """
        attempts: list[str] = []
        _ATTEMPTS.set(attempts)
        try:
            try:
                comp = await client.chat.completions.create(
                    model=self.model, messages=msgs, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens,
                    seed=seed, **({"response_format": rf} if (rf := response_format(mode)) is not None else {}),
                )
            except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
                raise NotACompletion(f"{type(e).__name__}: {e}") from None
            try:
                choice = comp.choices[0]
                content, refusal, finish = choice.message.content or "", choice.message.refusal, choice.finish_reason
            except (IndexError, TypeError, AttributeError) as e:
                raise NotACompletion(f"no choices[0].message ({type(e).__name__})") from None
            if comp.usage is not None:
                meta["prompt_tokens"] += comp.usage.prompt_tokens or 0
                meta["completion_tokens"] += comp.usage.completion_tokens or 0
            self.reached = True
            return content, refusal, finish
        except openai.APIStatusError:
            self.reached = True  # the server answered, with an error status
            raise
        finally:
            meta["attempts"] += len(attempts)
            meta["retries"].update(attempts[:-1])  # the last attempt's outcome is the call's, not a retry

    async def _one(self, client: openai.AsyncOpenAI, it: Item) -> GenResult:
        """Ask for one product's row until a valid answer, a final failure, or `max_invalid_retries` re-asks."""
        cfg = self.cfg
        msgs = prompts.cot_messages(it.title, it.content, it.style, few_shot=cfg.few_shot)
        meta: dict[str, Any] = {"attempts": 0, "retries": Counter(), "seconds": 0.0, "prompt_tokens": 0,
                                "completion_tokens": 0, "invalid_answers": Counter()}
        t0 = time.perf_counter()

        def result(**kw: Any) -> GenResult:
            meta["seconds"] = round(time.perf_counter() - t0, 3)
            meta["retries"], meta["invalid_answers"] = dict(meta["retries"]), dict(meta["invalid_answers"])
            return GenResult(it, meta=meta, **kw)

        raw, reason, detail = "", None, ""
        k = bad_bodies = 0
        while k <= cfg.max_invalid_retries:
            mode, before = self.rf_mode, meta["attempts"]
            try:
                seed = (cfg.seed + stable_hash("req", it.uid) + k) % 2**31
                content, refusal, finish = await self._ask(client, msgs, mode, seed, meta)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                hint = f" (wrong base URL or model {self.model!r}?)" if e.status_code == 404 else ""
                raise EndpointError(redact(f"{cfg.base_url}: HTTP {e.status_code}{hint}: {e.message}"[:500], self.key)) from None
            except openai.APIStatusError as e:
                msg = redact(str(e.message), self.key)[:300]
                if e.status_code == 400 and mode != "none" and re.search(r"response_format|json_schema|schema", msg, re.I):
                    # Older servers reject json_schema: fall back to json_object, then to a plain prompt, once per
                    # run (requests in flight that used the old mode must not skip a step).
                    if self.rf_mode == mode:
                        self.rf_mode = "json_object" if mode == "json_schema" else "none"
                        log.warning("cot openai: server rejected response_format %s; falling back to %s", mode, self.rf_mode)
                    continue
                exhausted = _retryable_status(e.status_code) and meta["attempts"] - before > cfg.max_retries
                why = f"retries_exhausted:{e.status_code}" if exhausted else f"http_{e.status_code}"
                return result(reason=why, detail=msg, retryable=True)
            except openai.APIConnectionError as e:  # timeouts included: the client retried them max_retries times
                what = "timeout" if isinstance(e, openai.APITimeoutError) else "connection"
                if what == "connection" and not self.reached:  # nothing ever answered: a wrong URL or no server
                    raise EndpointError(f"{cfg.base_url}: cannot connect ({redact(str(e), self.key)[:120]}); is the "
                                        "server running and is cot.base_url right?") from None
                detail = f"no answer within {cfg.timeout_s}s" if what == "timeout" else redact(str(e), self.key)[:300]
                return result(reason=f"retries_exhausted:{what}", detail=detail, retryable=True)
            except NotACompletion as e:
                if bad_bodies >= cfg.max_retries:
                    return result(reason="retries_exhausted:bad_body", detail=redact(str(e), self.key)[:300], retryable=True)
                bad_bodies += 1
                meta["retries"]["bad_body"] += 1
                log.debug("cot openai: a 200 answer for %s is no chat completion (%s); asking again", it.uid, e)
                continue
            raw = redact(content, self.key)
            if refusal:
                ans, reason, detail = None, "refusal", redact(str(refusal), self.key)[:300]
            else:
                ans, reason, detail = parse_answer(raw)
                if ans is None and finish == "length":
                    reason, detail = "truncated", f"finish_reason=length; {detail}"
            if ans is not None:
                return result(answer=ans, raw=raw)
            meta["invalid_answers"][reason] += 1
            k += 1
        return result(raw=raw, reason=reason, detail=detail)
