"""The sales assistant's web page: describe a product from its title (Llama track, with the retrieved products) and
answer a shopper's question (DeepSeek track, its reasoning folded away), the text streamed as it is generated.

    prodtune serve                        # after ./run_all.sh: models/cpu/{llama,deepseek,chroma}; open http://127.0.0.1:8000
    prodtune serve --run-llama models/colab-t4/llama --run-deepseek models/colab-t4/deepseek --port 8080
    prodtune serve --run-deepseek models/cpu/deepseek          # one track: the page shows its form only

Starlette on uvicorn (uvicorn comes with chromadb; Starlette is small and pure Python), and one static page of HTML
and plain JS (`prodtune/web/index.html`): no build step, nothing fetched from the internet, works offline on CPU.
The runs are loaded once at start (`prodtune.assistant.load_run`) and answer through `assistant.answer`, the function
behind `prodtune generate` and `chat`, so the page prompts and decodes exactly as they do.

Endpoints: `GET /` the page; `GET /api/info` the loaded tracks and store; `GET /api/describe?title=T` and
`GET /api/ask?question=Q` answer as server-sent events: `retrieved` (the products found, before the text), one
`token` per streamed piece, then `done` (the parsed result: `text`, `thinking`/`answer`, `retrieved`) or `fail`
(a one-line message). Each model generates one request at a time; others wait their turn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from prodtune.assistant import TRACKS, Run, answer, load_run
from prodtune.io import UserError, log, project_root

PAGE = Path(__file__).with_name("web") / "index.html"
DEFAULT_PROFILE = "cpu"  # what ./run_all.sh trains by default


def sse(event: str, data: Any) -> bytes:
    """One server-sent event; `data` as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Assistant:
    """The loaded runs and store, and the streams of answers.

    Args:
        runs: track -> loaded run (one or both tracks).
        store: an open Chroma store for the Llama track's retrieval, or None (descriptions from the title alone).
        k: products retrieved per title.
        max_new_tokens: longest reply (None: the run card's).
    """

    def __init__(self, runs: dict[str, Run], store: Any = None, store_dir: str | None = None, k: int = 3,
                 max_new_tokens: int | None = None) -> None:
        self.runs, self.store, self.store_dir, self.k, self.max_new_tokens = runs, store, store_dir, k, max_new_tokens
        self.locks = {track: threading.Lock() for track in runs}

    def info(self) -> dict[str, Any]:
        return {"tracks": {t: {"run": str(r.run_dir), "base_model": r.card.get("base_model")} for t, r in self.runs.items()},
                "store": self.store_dir, "k": self.k if self.store is not None else 0}

    def stream(self, track: str, text: str) -> Iterator[bytes]:
        """Events for one request: generation runs in a worker thread that hands each piece over a queue."""
        if track not in self.runs:
            flag = "--run-llama" if track == "llama" else "--run-deepseek"
            yield sse("fail", {"message": f"no {track}-track run is loaded: start `prodtune serve` with {flag} DIR"})
            return
        events: queue.Queue = queue.Queue()
        done = object()

        def work() -> None:
            try:
                with self.locks[track]:
                    run = self.runs[track]
                    kw: dict[str, Any] = {"title": text} if track == "llama" else {"question": text}
                    if track == "llama" and self.store is not None and text.strip():
                        from prodtune.rag import retrieve_context

                        hits = retrieve_context(self.store, text, k=self.k)  # shown before the text streams
                        events.put(sse("retrieved", [{k: h.get(k) for k in ("uid", "title", "score")} for h in hits]))
                        kw.update(rag=self.store, k=self.k)
                    result = answer(run, stream=lambda piece: piece and events.put(sse("token", piece)),
                                    max_new_tokens=self.max_new_tokens, **kw)
                keep = ("track", "text", "thinking", "answer", "seconds", "retrieved")
                out = {k: result[k] for k in keep if k in result}
                if "retrieved" in out:
                    out["retrieved"] = [{k: h.get(k) for k in ("uid", "title", "score")} for h in out["retrieved"]]
                events.put(sse("done", out))
            except UserError as e:
                events.put(sse("fail", {"message": " ".join(str(e).split())}))
            except Exception as e:  # the page gets one line; the terminal the traceback
                log.exception("serve: %s request failed", track)
                events.put(sse("fail", {"message": f"{type(e).__name__}: {e}"}))
            finally:
                events.put(done)

        threading.Thread(target=work, daemon=True).start()
        while (item := events.get()) is not done:
            yield item


def make_app(assistant: Assistant) -> Any:
    """The Starlette app: the page, /api/info and the two event streams."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    page = PAGE.read_text(encoding="utf-8")
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    async def index(request: Any) -> HTMLResponse:
        return HTMLResponse(page)

    async def info(request: Any) -> JSONResponse:
        return JSONResponse(assistant.info())

    async def describe(request: Any) -> StreamingResponse:
        return StreamingResponse(assistant.stream("llama", request.query_params.get("title", "")),
                                 media_type="text/event-stream", headers=headers)

    async def ask(request: Any) -> StreamingResponse:
        return StreamingResponse(assistant.stream("deepseek", request.query_params.get("question", "")),
                                 media_type="text/event-stream", headers=headers)

    return Starlette(routes=[Route("/", index), Route("/api/info", info), Route("/api/describe", describe),
                             Route("/api/ask", ask)])


def load_assistant(run_llama: str | None = None, run_deepseek: str | None = None, store: str | None = None, *,
                   k: int = 3, max_new_tokens: int | None = None, device: str = "auto") -> Assistant:
    """Load the runs and the store the flags name; unnamed ones default to `models/cpu/...` under the project root.

    A default folder that does not exist is skipped (its form is hidden); a named one must exist.

    Raises:
        UserError: a named folder is missing or not a run, or no run is found at all.
    """
    models = project_root() / "models" / DEFAULT_PROFILE
    given = {"llama": run_llama, "deepseek": run_deepseek}
    runs: dict[str, Run] = {}
    for track in TRACKS:
        folder = Path(given[track]) if given[track] else models / track
        if given[track] is None and not folder.is_dir():
            log.info("serve: no %s-track run at %s; its form is hidden", track, folder)
            continue
        runs[track] = load_run(folder, device=device)
        if runs[track].track != track:
            raise UserError(f"{folder} is a {runs[track].track}-track run; pass it as --run-{runs[track].track}")
    if not runs:
        raise UserError(f"no trained run in {models}/llama or {models}/deepseek: run ./run_all.sh (or `prodtune train "
                        "--track llama`), or name a run with --run-llama / --run-deepseek")
    opened, store_dir = None, None
    if "llama" in runs:
        store_dir = Path(store) if store else runs["llama"].run_dir.parent / "chroma"
        if store_dir.is_dir():
            from prodtune.rag import open_store

            opened = open_store(str(store_dir))
        elif store:
            raise UserError(f"--store {store}: no Chroma store there; build it with `prodtune rag`")
        else:
            log.info("serve: no store at %s; descriptions are written from the title alone", store_dir)
            store_dir = None
    return Assistant(runs, opened, str(store_dir) if opened is not None else None, k=k, max_new_tokens=max_new_tokens)


def make_parser() -> argparse.ArgumentParser:
    """Flags of `prodtune serve`."""
    p = argparse.ArgumentParser(prog="prodtune serve", description="the sales assistant's web page: describe a "
                                "product (Llama track + retrieved products), answer a shopper (DeepSeek track)")
    p.add_argument("--run-llama", "--run_llama", default=None, metavar="DIR", help="Llama-track run (default: models/cpu/llama when it exists)")
    p.add_argument("--run-deepseek", "--run_deepseek", default=None, metavar="DIR", help="DeepSeek-track run (default: models/cpu/deepseek when it exists)")
    p.add_argument("--store", default=None, metavar="DIR", help="Chroma store for the retrieved products (default: chroma/ beside the Llama run)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--k", type=int, default=3, help="products retrieved per title")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=None, help="longest reply (default: run card, else 160 / 256)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the models run")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """`prodtune serve`: load, then serve until Ctrl-C."""
    import uvicorn

    args = make_parser().parse_args(list(argv or []))
    assistant = load_assistant(args.run_llama, args.run_deepseek, args.store, k=args.k,
                               max_new_tokens=args.max_new_tokens, device=args.device)
    app = make_app(assistant)
    tracks = ", ".join(f"{t} ({r.run_dir})" for t, r in assistant.runs.items())
    print(f"prodtune serve: {tracks}; store {assistant.store_dir or '(none)'}", flush=True)
    print(f"prodtune serve: open http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
