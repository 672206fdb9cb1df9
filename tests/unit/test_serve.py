"""The sales assistant's web page (`prodtune serve`): its event streams in process, then the page in a real headless
Chromium (Debian's `chromium` package driven by Playwright's Python package; no browser is downloaded).

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_serve.py -x -q          # ~1 min on 2 CPU cores

Runs are real (tiny random Llama + a saved LoRA adapter, as in test_assistant.py) and so is the store (Chroma, 6
products embedded with the offline MiniLM). The browser test starts `prodtune serve` on a free loopback port as a
user would, types a title and a question, waits for the streamed answers and saves outputs/serve_test.png.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from test_assistant import QUESTION, TITLE, make_run

from conftest import ROOT
from prodtune import models as MD
from prodtune import serve as S
from prodtune.io import UserError

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TITLES = [TITLE, "Birchmont Yoga Block Foam", "Stainless Steel Water Bottle 750 ml", "Kids Rain Boots Yellow",
          "Cast Iron Skillet 26 cm", "Wireless Computer Mouse"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/<profile>/{llama,deepseek,chroma}: two tiny runs and a 6-product store beside them."""
    from prodtune import rag as R

    root = tmp_path_factory.mktemp("serve")
    tiny = MD.make_tiny_llama(root / "base")
    out = root / "models" / "t"
    for i, track in enumerate(("llama", "deepseek")):
        make_run(tiny, out / track, track, str(tiny), seed=i)
    data = root / "prepared"
    data.mkdir()
    pd.DataFrame({"uid": [f"U{i}" for i in range(len(TITLES))], "title": TITLES,
                  "content": [f"{t}. A dependable product described in plain words for shoppers." for t in TITLES]}
                 ).to_parquet(data / "train.parquet")
    R.build_store(R.RagConfig(data_dir=str(data), persist_dir=str(out / "chroma"), out_dir=str(data / "out"),
                              splits=["train"], device="cpu", progress=False))
    return out


def events(body: str) -> list[tuple[str, object]]:
    """Parse a server-sent event stream into (event, data) pairs."""
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# ----------------------------------------------------------------------------------------------
# In process (Starlette's TestClient)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(models_dir: Path):
    from starlette.testclient import TestClient

    assistant = S.load_assistant(str(models_dir / "llama"), str(models_dir / "deepseek"), k=2,
                                 max_new_tokens=MAX_NEW, device="cpu")
    with TestClient(S.make_app(assistant)) as c:
        yield c


def test_page_and_info(client, models_dir: Path) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="describe-form"' in page.text and "<details" in page.text
    assert "http" not in page.text.split("<script>")[1]  # nothing fetched from outside: works offline
    info = client.get("/api/info").json()
    assert set(info["tracks"]) == {"llama", "deepseek"} and info["k"] == 2
    assert info["store"] == str(models_dir / "chroma")


def test_describe_streams_the_retrieved_products_then_the_text(client) -> None:
    res = client.get("/api/describe", params={"title": TITLE})
    assert res.headers["content-type"].startswith("text/event-stream")
    ev = events(res.text)
    kinds = [k for k, _ in ev]
    assert kinds[0] == "retrieved" and kinds[-1] == "done" and kinds.count("token") >= 1
    assert [h["uid"] for h in ev[0][1]][:1] == ["U0"] and len(ev[0][1]) == 2
    done = ev[-1][1]
    assert done["retrieved"] == ev[0][1] and done["text"]  # the same products before and after, a description
    assert "".join(d for k, d in ev if k == "token").strip().startswith(done["text"][:10])


def test_ask_streams_the_reply_and_splits_reasoning_and_answer(client) -> None:
    ev = events(client.get("/api/ask", params={"question": QUESTION}).text)
    done = ev[-1][1]
    assert ev[-1][0] == "done" and {"thinking", "answer", "text"} <= set(done)
    assert "".join(d for k, d in ev if k == "token").strip() == done["text"]


@pytest.mark.parametrize(("path", "said"), [("/api/describe?title=%20", "needs a title"),
                                            ("/api/ask?question=", "needs a question")])
def test_empty_input_is_a_one_line_failure_event(client, path: str, said: str) -> None:
    ev = events(client.get(path).text)
    assert ev[0][0] == "fail" and said in ev[0][1]["message"] and len(ev) == 1


def test_missing_runs_and_stores_are_user_errors(models_dir: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="--store .*: no Chroma store"):
        S.load_assistant(str(models_dir / "llama"), store=str(tmp_path / "none"), device="cpu")
    with pytest.raises(UserError, match="is a deepseek-track run; pass it as --run-deepseek"):
        S.load_assistant(str(models_dir / "deepseek"), device="cpu")
    monkeypatch.setenv("PRODTUNE_ROOT", str(tmp_path))  # no models/cpu/ there: nothing to serve
    with pytest.raises(UserError, match=r"no trained run .* run \./run_all\.sh"):
        S.load_assistant()
    only = S.load_assistant(run_deepseek=str(models_dir / "deepseek"), device="cpu")  # the default llama is absent
    assert list(only.runs) == ["deepseek"] and only.store is None
    ev = events(b"".join(only.stream("llama", TITLE)).decode())
    assert ev[0][0] == "fail" and "--run-llama" in ev[0][1]["message"]


# ----------------------------------------------------------------------------------------------
# The page in a real headless Chromium
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`prodtune serve` in a subprocess on a free loopback port; yields its URL once /api/info answers."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "prodtune", "serve", "--run-llama", str(models_dir / "llama"),
                                 "--run-deepseek", str(models_dir / "deepseek"), "--port", str(port), "--k", "3",
                                 "--max-new-tokens", str(MAX_NEW), "--device", "cpu"],
                                cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/api/info", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"prodtune serve did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: install Debian's chromium package "
                    "(apt-get install -y chromium; .ci/run does) to run the browser test")
def test_the_page_in_headless_chromium(server: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    shot = ROOT / "outputs" / "serve_test.png"
    shot.parent.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server)
            expect(page.locator("body[data-ready='1']")).to_have_count(1, timeout=30_000)
            expect(page.locator("#models")).to_contain_text("llama:")
            # describe a product: the retrieved products listed, a non-empty description
            page.fill("#title", TITLE)
            page.click("#describe-btn")
            expect(page.locator("#description[data-state='done']")).to_have_count(1, timeout=120_000)
            description = page.inner_text("#description").strip()
            assert description and description != "(the model wrote nothing)"
            assert int(page.get_attribute("#description", "data-pieces")) > 1  # it arrived in pieces (streamed)
            hits = page.locator("#retrieved li")
            expect(hits).to_have_count(3)
            assert TITLE in hits.nth(0).inner_text()  # the exact title comes back first
            # ask the assistant: an answer, the reasoning folded away
            page.fill("#question", QUESTION)
            page.click("#ask-btn")
            expect(page.locator("#answer[data-state='done']")).to_have_count(1, timeout=120_000)
            answer = page.inner_text("#answer").strip()
            assert answer and answer != "(no answer)"
            assert page.locator("#reasoning").get_attribute("open") is None  # folded
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    # what the page shows is what the API gives for the same input (greedy decoding)
    with urllib.request.urlopen(f"{server}/api/describe?title={urllib.parse.quote(TITLE)}", timeout=120) as r:
        assert events(r.read().decode())[-1][1]["text"].strip() == description
