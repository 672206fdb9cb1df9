"""Stage 02's `openai` backend (the official `openai` client) against a real HTTP server on loopback that injects
faults (tests/fakeopenai.py).

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_cot_openai.py -q

The server answers 429 (Retry-After), 500 (echoing the Authorization header), slow answers past the client's
timeout, non-JSON bodies, truncated JSON and schema-violating objects. The client's own `max_retries`/`timeout`
must absorb the transport faults and stage 02 the content faults: the run must finish, count every retry by
cause, write each product exactly once, lose none, resume after a kill -9, and never write or log the API key.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fakeopenai import FakeOpenAI

from conftest import ROOT
from prodtune import cot
from prodtune.cot import CoTConfig
from prodtune.cot.openai_backend import EndpointError
from prodtune.io import UserError

KEY = "sk-test-NeverLogMe-0123456789"
ENV = "PRODTUNE_TEST_COT_KEY"
ALL_FAULTS = {"429": 0.12, "500": 0.08, "slow": 0.04, "bad_body": 0.04, "malformed": 0.1, "schema": 0.1}


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)


def _cfg(url: str, data: Path, out: Path, **kw) -> CoTConfig:
    base = dict(backend="openai", base_url=url, model="fake-model", api_key_env=ENV, concurrency=8, timeout_s=1.0,
                seed=7, data_dir=str(data), out_dir=str(out), progress=False)
    return CoTConfig(**{**base, **kw})


def _all_text(out: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in out.iterdir() if p.is_file())


def _uids(out: Path, name: str) -> list[str]:
    return [json.loads(x)["uid"] for x in (out / name).read_text().splitlines() if x.strip()]


def _times_by_title(srv: FakeOpenAI) -> dict[str, list[float]]:
    by_title: dict[str, list[float]] = {}
    for r in srv.requests:
        by_title.setdefault(r["title"], []).append(r["t"])
    return by_title


def test_faults_are_retried_counted_and_nothing_is_lost_or_duplicated(
    prepared_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="prodtune")
    n = 60
    with FakeOpenAI(faults=ALL_FAULTS, slow_s=3.5, require_key=KEY, seed=1) as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=n, timeout_s=2.0))
    assert stats["complete"] and stats["pending_retryable"] == 0
    # Every product decided exactly once: a row or a reject (near-duplicate questions are the only rejects here).
    rows, rejects = _uids(tmp_path, "cot.jsonl"), _uids(tmp_path, "rejects.jsonl")
    assert len(rows) == len(set(rows)) == stats["rows"] and not set(rows) & set(rejects)
    selected = {it.uid for it in cot.load_products(prepared_dir, seed=7)[:n]}
    assert set(rows) | set(rejects) == selected
    assert set(stats["rejected_by_reason"]) <= {"near_duplicate"} and stats["rows"] >= 0.9 * n
    # Retries counted per cause match the faults the server injected.
    injected = srv.injected
    assert min(injected[f] for f in ALL_FAULTS) >= 1, injected
    http = stats["retries"]["http"]
    assert http.get("429", 0) == injected["429"] and http.get("500", 0) == injected["500"]
    assert http.get("bad_body", 0) == injected["bad_body"] and http.get("timeout", 0) >= injected["slow"]
    invalid = stats["retries"]["invalid_answers"]
    assert invalid.get("invalid_json", 0) == injected["malformed"] and invalid.get("schema_violation", 0) == injected["schema"]
    # Each attempt reached the server, except timeouts on a loaded machine that may expire before it reads one.
    attempts = n + sum(http.values()) + sum(invalid.values())
    assert attempts - (http.get("timeout", 0) - injected["slow"]) <= len(srv.requests) <= attempts
    # Structured output was asked for; the key went only into the Authorization header.
    assert {r["response_format"] for r in srv.requests} == {"json_schema"}
    assert {r["auth"] for r in srv.requests} == {f"Bearer {KEY}"}
    assert KEY not in _all_text(tmp_path) and KEY not in caplog.text
    assert "internal error (request had Bearer ***)" in caplog.text  # the 500 body echoed the key: masked


def test_concurrency_is_limited_and_used(prepared_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAI(latency_s=0.1) as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=24, concurrency=6))
    assert stats["complete"] and srv.max_in_flight == 6
    assert stats["this_run"]["seconds"] < 24 * 0.1 / 2  # sequential would take 2.4 s, 6 at a time 0.4 s


@pytest.mark.parametrize("header, value", [("Retry-After", "1"), ("retry-after-ms", "1000")])
def test_retry_after_is_honoured(prepared_dir: Path, tmp_path: Path, header: str, value: str) -> None:
    with FakeOpenAI(faults={"429": 1.0}, max_faults_per_product=1, retry_after=value, retry_after_header=header) as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=2))
    assert stats["rows"] + stats["rejected"] == 2 and stats["retries"]["http"] == {"429": 2}
    for t in _times_by_title(srv).values():
        assert len(t) == 2 and t[1] - t[0] >= 0.95  # the client's own backoff would wait 0.375-0.5 s


def test_without_retry_after_the_client_backs_off_exponentially(prepared_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAI(faults={"500": 1.0}, max_faults_per_product=3) as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=1, max_retries=3))
    assert stats["rows"] + stats["rejected"] == 1 and stats["retries"]["http"] == {"500": 3}
    (t,) = _times_by_title(srv).values()
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert len(gaps) == 3 and gaps[0] >= 0.3 and gaps[1] > 1.4 * gaps[0] and gaps[2] > 1.4 * gaps[1], gaps


def test_a_retry_after_beyond_the_clients_limit_leaves_the_product_for_a_later_run(prepared_dir: Path, tmp_path: Path) -> None:
    # The client waits at most 120 s for a Retry-After; a server asking for 10 minutes is not retried at all.
    with FakeOpenAI(faults={"429": 1.0}, max_faults_per_product=1, retry_after="600") as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=2))
    assert not stats["complete"] and stats["pending_by_reason"] == {"http_429": 2} and len(srv.requests) == 2
    assert stats["this_run"]["seconds"] < 30
    with FakeOpenAI() as srv2:  # the quota came back
        again = cot.run(_cfg(srv2.base_url, prepared_dir, tmp_path, n=2))
    assert again["complete"] and again["rows"] + again["rejected"] == 2 and len(srv2.requests) == 2


def test_invalid_answers_are_reasked_then_rejected_with_the_reason(prepared_dir: Path, tmp_path: Path) -> None:
    first = cot.load_products(prepared_dir, seed=7)[0]
    with FakeOpenAI(always_invalid={first.title}) as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=3, max_invalid_retries=2))
    assert srv.products_requested()[first.title] == 3  # asked, then re-asked twice
    assert stats["rejected_by_reason"].get("schema_violation") == 1 and stats["funnel"][1][1] == 2
    rej = cot.load_rejects(tmp_path)
    row = rej[rej.uid == first.uid].iloc[0]
    assert row.reason == "schema_violation" and "Field required" in row.detail and '"question"' in row.raw


def test_exhausted_retries_are_pending_and_a_rerun_completes(prepared_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAI(faults={"500": 1.0}, max_faults_per_product=100) as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=4, max_retries=1))
    assert not stats["complete"] and stats["pending_retryable"] == 4 and stats["rows"] == 0
    assert stats["pending_by_reason"] == {"retries_exhausted:500": 4} and len(srv.requests) == 8
    with FakeOpenAI() as srv2:
        again = cot.run(_cfg(srv2.base_url, prepared_dir, tmp_path, n=4))
    assert again["complete"] and again["rows"] + again["rejected"] == 4 and len(srv2.requests) == 4
    assert again["retries"]["http"] == {"500": 4}  # the first run's cost is still on the books


def test_a_refused_key_stops_the_run_without_leaking_it(prepared_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, "sk-wrong-key-abcdef")
    with FakeOpenAI(require_key=KEY) as srv, pytest.raises(EndpointError) as err:
        cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=5))
    assert "401" in str(err.value) and "sk-wrong-key-abcdef" not in str(err.value)
    assert isinstance(err.value, UserError)  # the CLI prints it on one line and exits 2
    assert len(srv.requests) <= 8  # stopped at once, not 5 products x retries


def test_a_wrong_base_url_stops_the_run_and_says_so(prepared_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAI() as srv, pytest.raises(EndpointError, match="404 .wrong base URL or model 'fake-model'"):
        cot.run(_cfg(srv.base_url.removesuffix("/v1"), prepared_dir, tmp_path, n=3))
    assert not (tmp_path / "rejects.jsonl").read_text()  # nothing marked as done: a fixed rerun does all 3


def test_a_server_without_json_schema_falls_back_to_json_object(prepared_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAI(reject_json_schema=True) as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=5, concurrency=1))
    assert stats["complete"] and stats["rows"] + stats["rejected"] == 5
    assert stats["this_run"]["structured_output"] == "json_object"
    assert Counter(r["response_format"] for r in srv.requests) == {"json_schema": 1, "json_object": 5}


def test_it_runs_where_an_event_loop_is_already_running(prepared_dir: Path, tmp_path: Path) -> None:
    import asyncio

    async def notebook_cell() -> dict:  # Jupyter runs cells inside a running loop: asyncio.run() would refuse
        return cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=3))

    with FakeOpenAI() as srv:
        stats = asyncio.run(notebook_cell())
    assert stats["complete"] and stats["rows"] + stats["rejected"] == 3


def test_a_killed_run_resumes_without_duplicates_or_losses(prepared_dir: Path, tmp_path: Path) -> None:
    n, out = 80, tmp_path / "out"
    env = {**os.environ, ENV: KEY, "PYTHONUNBUFFERED": "1"}
    with FakeOpenAI(latency_s=0.05, faults={"429": 0.1, "malformed": 0.1}, seed=3) as srv:
        # A child process running the stage as `prodtune cot` does, logging everything (the client's DEBUG lines too).
        cfg = {"backend": "openai", "data_dir": str(prepared_dir), "out_dir": str(out), "n": n, "base_url": srv.base_url,
               "model": "fake-model", "api_key_env": ENV, "concurrency": 2, "seed": 7, "progress": False}
        code = ("import json, logging, sys; logging.basicConfig(level=logging.DEBUG); "
                "from prodtune.cot import CoTConfig, run; run(CoTConfig(**json.loads(sys.argv[1])))")
        cmd = [sys.executable, "-c", code, json.dumps(cfg)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            rows = out / "cot.jsonl"
            if rows.is_file() and rows.read_bytes().count(b"\n") >= 15:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)  # no cleanup at all: the harshest interruption
        log1 = proc.communicate()[0].decode()
        done_at_kill = set(_uids(out, "cot.jsonl")) | set(_uids(out, "rejects.jsonl"))
        n_req_at_kill = len(srv.requests)
        assert 15 <= len(done_at_kill) < n

        stats = cot.run(_cfg(srv.base_url, prepared_dir, out, n=n, concurrency=4))
    assert stats["complete"] and stats["this_run"]["resumed_done"] == len(done_at_kill)
    rows, rejects = _uids(out, "cot.jsonl"), _uids(out, "rejects.jsonl")
    assert len(rows) == len(set(rows)) and len(rejects) == len(set(rejects)) and not set(rows) & set(rejects)
    assert set(rows) | set(rejects) == {it.uid for it in cot.load_products(prepared_dir, seed=7)[:n]}
    # Finished products were not asked for again after the restart (in-flight ones at the kill were).
    sel = cot.load_products(prepared_dir, seed=7)[:n]
    pending_titles = {it.title for it in sel if it.uid not in done_at_kill}
    done_titles = {it.title for it in sel if it.uid in done_at_kill} - pending_titles
    asked_again = {r["title"] for r in srv.requests[n_req_at_kill:]}
    assert done_titles and not asked_again & done_titles
    assert KEY not in log1 and KEY not in _all_text(out)


def test_a_server_without_keys_gets_a_placeholder(prepared_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV)  # vLLM, Ollama, llama.cpp: no key needed; the client still wants one
    with FakeOpenAI() as srv:
        stats = cot.run(_cfg(srv.base_url, prepared_dir, tmp_path, n=2))
    assert stats["complete"] and {r["auth"] for r in srv.requests} == {"Bearer no-key"}


def test_a_base_url_on_the_command_line_means_the_openai_backend(prepared_dir: Path, tmp_path: Path) -> None:
    """`prodtune cot --profile colab-t4 --base_url URL`: the GPU profile's local backend gives way to the server."""
    from prodtune.cli import run_stage

    out = tmp_path / "out"
    with FakeOpenAI(latency_s=0.0, seed=1) as srv:
        stats = run_stage("cot", ["--profile", "colab-t4", "--base_url", srv.base_url, "--model", "fake-model",
                                  "--api_key_env", ENV, "--data_dir", str(prepared_dir), "--out_dir", str(out),
                                  "--n", "4", "--progress", "false"])
        assert len(srv.requests) >= 4
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["backend"] == "openai" and run_json["base_url"] == srv.base_url and stats["complete"]
