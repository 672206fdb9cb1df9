"""Stage 01's input from a URL: a real HTTP server on loopback (with Range support, and ways to misbehave) serves a
trn.json.gz and a zip archive built here; downloads are atomic, resume, are not repeated, and unpack the trn file."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from prodtune.data.fetch import fetch_input
from prodtune.io import InputError

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "trn_sample.jsonl"


class State:
    """What the server holds and what it was asked."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.cut_once: set[str] = set()  # paths whose next response stops halfway (a dropped connection)


def _handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            rng = self.headers.get("Range")
            state.requests.append((self.path, rng))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if rng and not state.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            part = body[start:]
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            if self.path in state.cut_once:
                state.cut_once.discard(self.path)
                self.wfile.write(part[: len(part) // 2])
                self.close_connection = True
                return
            self.wfile.write(part)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def dump() -> dict[str, bytes]:
    gz = gzip.compress(SAMPLE.read_bytes())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # the dataset's raw archive: a folder with trn, tst and lbl
        zf.writestr("LF-AmazonTitles-1.3MM/lbl.json.gz", gzip.compress(b"{}\n"))
        zf.writestr("LF-AmazonTitles-1.3MM/trn.json.gz", gz)
        zf.writestr("LF-AmazonTitles-1.3MM/tst.json.gz", gzip.compress(b"{}\n"))
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("README.txt", "no data here")
    return {"/x/trn.json.gz": gz, "/x/LF-AmazonTitles-1.3MM.raw.zip": buf.getvalue(), "/x/empty.zip": empty.getvalue()}


@pytest.fixture
def server(dump: dict[str, bytes]) -> Iterator[tuple[str, State]]:
    state = State(dict(dump))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_gz_url_is_downloaded_once(server, dump, tmp_path: Path) -> None:
    url, state = server
    path = fetch_input(f"{url}/x/trn.json.gz", tmp_path / "raw", progress=True)
    assert path == tmp_path / "raw" / "trn.json.gz" and path.read_bytes() == dump["/x/trn.json.gz"]
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["trn.json.gz"]  # no .part left
    assert fetch_input(f"{url}/x/trn.json.gz", tmp_path / "raw") == path
    assert len(state.requests) == 1  # the second call found it


def test_the_archive_is_unpacked_to_its_trn_file(server, dump, tmp_path: Path) -> None:
    url, state = server
    path = fetch_input(f"{url}/x/LF-AmazonTitles-1.3MM.raw.zip", tmp_path / "raw", progress=False)
    assert path == tmp_path / "raw" / "LF-AmazonTitles-1.3MM.raw" / "trn.json.gz"
    assert path.read_bytes() == dump["/x/trn.json.gz"]
    assert not (tmp_path / "raw" / "LF-AmazonTitles-1.3MM.raw.zip").exists()  # only the trn file is kept
    assert fetch_input(f"{url}/x/LF-AmazonTitles-1.3MM.raw.zip", tmp_path / "raw") == path
    assert len(state.requests) == 1


def test_a_dropped_download_is_kept_and_resumed(server, dump, tmp_path: Path) -> None:
    url, state = server
    state.cut_once.add("/x/trn.json.gz")
    with pytest.raises(InputError, match="run again to resume"):
        fetch_input(f"{url}/x/trn.json.gz", tmp_path, progress=False)
    part = tmp_path / "trn.json.gz.part"
    assert 0 < part.stat().st_size < len(dump["/x/trn.json.gz"]) and not (tmp_path / "trn.json.gz").exists()
    got = part.stat().st_size
    path = fetch_input(f"{url}/x/trn.json.gz", tmp_path, progress=False)
    assert path.read_bytes() == dump["/x/trn.json.gz"] and not part.exists()
    assert state.requests[-1] == ("/x/trn.json.gz", f"bytes={got}-")  # only the rest was asked for


@pytest.mark.parametrize("case", ["server ignores Range", "part file complete", "part file too long"])
def test_a_part_file_the_server_cannot_continue_starts_over(server, dump, tmp_path: Path, case: str) -> None:
    url, state = server
    body = dump["/x/trn.json.gz"]
    state.ignore_range = case == "server ignores Range"
    (tmp_path / "trn.json.gz.part").write_bytes({"server ignores Range": body[:100], "part file complete": body,
                                                 "part file too long": body + b"junk"}[case])
    path = fetch_input(f"{url}/x/trn.json.gz", tmp_path, progress=False)
    assert path.read_bytes() == body


def test_http_errors_and_archives_without_data_are_one_line_input_errors(server, tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(InputError, match="HTTP 404"):
        fetch_input(f"{url}/x/missing.json.gz", tmp_path)
    with pytest.raises(InputError, match=r"no trn.json.gz / trn.json / trn.jsonl inside \(it holds README.txt\)"):
        fetch_input(f"{url}/x/empty.zip", tmp_path)
    with pytest.raises(InputError, match="download failed"):
        fetch_input("http://127.0.0.1:9/trn.json.gz", tmp_path)  # nothing listens on the discard port


def test_a_local_archive_is_unpacked_and_kept(dump, tmp_path: Path) -> None:
    archive = tmp_path / "mine.zip"
    archive.write_bytes(dump["/x/LF-AmazonTitles-1.3MM.raw.zip"])
    path = fetch_input(archive, tmp_path / "raw")
    assert path == tmp_path / "raw" / "mine" / "trn.json.gz" and archive.is_file()
    assert fetch_input(SAMPLE, tmp_path / "raw") == SAMPLE  # a JSON file is read where it is


def test_stage_01_reads_a_url_into_the_home(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prodtune.data import Config, run

    url, _ = server
    monkeypatch.setenv("PRODTUNE_HOME", str(tmp_path / "home"))
    local = run(Config(input=str(SAMPLE), out_dir=str(tmp_path / "local"), progress=False))
    remote = run(Config(input=f"{url}/x/LF-AmazonTitles-1.3MM.raw.zip", out_dir=str(tmp_path / "remote"), progress=False))
    assert remote["input"] == str(tmp_path / "home" / "data" / "raw" / "LF-AmazonTitles-1.3MM.raw" / "trn.json.gz")
    assert (remote["kept"], remote["splits"]) == (local["kept"], local["splits"])
    again = run(Config(input=f"{url}/x/LF-AmazonTitles-1.3MM.raw.zip", out_dir=str(tmp_path / "remote"), progress=False))
    assert again == remote  # reused: same config, outputs newer than the downloaded file


def test_prepare_takes_a_url_on_the_command_line(server, tmp_path: Path) -> None:
    import os

    url, _ = server
    env = {**os.environ, "PRODTUNE_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-m", "prodtune", "prepare", "--input", f"{url}/x/trn.json.gz", "--out_dir",
                          "out", "--sample", "40", "--progress", "false"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["kept"] == 40 and stats["input"] == str(tmp_path / "home" / "data" / "raw" / "trn.json.gz")
