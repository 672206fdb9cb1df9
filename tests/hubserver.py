"""A loopback stand-in for the Hugging Face Hub: the endpoints `huggingface_hub` (1.33) calls to create a repository,
commit files to it (regular and LFS "basic" uploads) and read them back, kept in memory.

    python tests/hubserver.py --port 8124 --token hf_test      # serve until Ctrl-C; then
    HF_ENDPOINT=http://127.0.0.1:8124 HF_TOKEN=hf_test HF_HUB_OFFLINE=0 prodtune push --run models/cpu/llama --repo me/x

What each client call sends (read from `huggingface_hub/hf_api.py`, `_commit_api.py`, `lfs.py`):

- `create_repo`: POST /api/repos/create `{"name", "organization", "type"?, "visibility"?}` -> `{"url"}`; 409 if it
  exists (`exist_ok=True` swallows it).
- `create_commit` / `upload_folder` / `upload_file`: POST /api/validate-yaml when README.md is in the commit; POST
  /api/{type}s/{repo}/preupload/{rev} `{"files": [{path, sample, size}]}` -> `{"files": [{path, uploadMode,
  shouldIgnore, oid}]}`; for "lfs" files, without hf_xet (HF_HUB_DISABLE_XET=1): POST
  /{prefix}{repo}.git/info/lfs/objects/batch -> an upload href, then PUT of the bytes there; finally POST
  /api/{type}s/{repo}/commit/{rev}, ndjson lines `header`, `file` (base64 content), `lfsFile` (sha256 oid),
  `deletedFile` / `deletedFolder` -> `{"commitUrl", "commitOid"}`.
- `repo_info`: GET /api/{type}s/{repo}[/revision/{rev}]; `list_repo_tree` / HfFileSystem: GET
  /api/{type}s/{repo}/tree/{rev}[/{path}]; `get_paths_info`: POST /api/{type}s/{repo}/paths-info/{rev};
  `hf_hub_download`: HEAD and GET /{prefix}{repo}/resolve/{rev}/{path}.

Files larger than `lfs_threshold` bytes (or named *.safetensors / *.gguf / *.parquet) are answered "lfs", as the Hub
does for binaries. Every request must carry `Authorization: Bearer <token>` (401 otherwise), except the LFS upload PUT, which goes
to a "presigned" URL (as to S3 on the real Hub) and carries no token. Requests the server
does not know are answered 404 and recorded in `unknown`, so a test can show what a new client version asks for.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".gguf", ".parquet", ".bin", ".pt")


def git_sha1(data: bytes) -> str:
    """A git blob id, what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One repository: its type, visibility, files and commits."""

    repo_type: str
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


class FakeHub:
    """The server and its state: `repos[(type, id)]`, `requests` (method, path), `unknown`, `auth_headers`.

    Args:
        token: the only bearer token accepted.
        lfs_threshold: files at least this large are uploaded through LFS.
    """

    def __init__(self, token: str, lfs_threshold: int = 10_000, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.sig = secrets.token_hex(8)  # the "presigned" LFS upload URLs carry this instead of the token
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    # -- request handling ------------------------------------------------------------------------------------------

    def upload_mode(self, path: str, size: int) -> str:
        return "lfs" if size and (size >= self.lfs_threshold or path.endswith(LFS_SUFFIXES)) else "regular"

    def handle(self, h: "_Handler", method: str) -> None:
        parts = urlsplit(h.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        with self.lock:
            self.requests.append((method, path))
        presigned = path.startswith("/lfs-upload/") and query.get("sig") == [self.sig]  # like S3: no token, a signature
        if not presigned and h.headers.get("Authorization") != f"Bearer {self.token}":
            return h.reply(401, {"error": "Invalid credentials in Authorization header"})
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method in ("POST", "PUT") else b""
        for pattern, meth, fn in self.routes():
            m = re.fullmatch(pattern, path)
            if m and meth == method:
                return fn(h, body, query, **m.groupdict())
        with self.lock:
            self.unknown.append((method, h.path))
        h.reply(404, {"error": f"fake hub: no route for {method} {path}"})

    def routes(self) -> list[tuple[str, str, Any]]:
        t = r"(?P<type>model|dataset|space)s"
        rid = r"(?P<repo_id>[^/]+/[^/]+?)"
        pfx = r"(?P<pfx>datasets/|spaces/)?"
        return [
            (r"/api/repos/create", "POST", self.create_repo),
            (r"/api/validate-yaml", "POST", lambda h, *_: h.reply(200, {"errors": [], "warnings": []})),
            (r"/api/whoami-v2", "GET", lambda h, *_: h.reply(200, {"name": "tester", "type": "user", "orgs": []})),
            (rf"/api/{t}/{rid}/preupload/(?P<rev>[^/]+)", "POST", self.preupload),
            (rf"/api/{t}/{rid}/commit/(?P<rev>[^/]+)", "POST", self.commit),
            (rf"/api/{t}/{rid}/paths-info/(?P<rev>[^/]+)", "POST", self.paths_info),
            (rf"/api/{t}/{rid}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", "GET", self.tree),
            (rf"/api/{t}/{rid}(?:/revision/(?P<rev>[^/]+))?", "GET", self.info),
            (rf"/{pfx}{rid}\.git/info/lfs/objects/batch", "POST", self.lfs_batch),
            (r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "PUT", self.lfs_put),
            (rf"/{pfx}{rid}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "GET", self.resolve),
            (rf"/{pfx}{rid}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "HEAD", self.resolve),
        ]

    def _repo(self, h: "_Handler", repo_type: str, repo_id: str) -> Repo | None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            h.reply(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
        return repo

    def create_repo(self, h: "_Handler", body: bytes, query: dict) -> None:
        p = json.loads(body)
        repo_type = p.get("type") or "model"
        repo_id = f"{p['organization']}/{p['name']}" if p.get("organization") else f"tester/{p['name']}"
        url = f"{self.url}/{PREFIX[repo_type]}{repo_id}"
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return h.reply(409, {"error": "You already created this repo", "url": url})
            self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private=p.get("visibility") == "private")
        h.reply(200, {"url": url, "name": repo_id})

    def preupload(self, h: "_Handler", body: bytes, query: dict, type: str, repo_id: str, rev: str) -> None:
        repo = self._repo(h, type, repo_id)
        if repo is None:
            return
        files = []
        for f in json.loads(body)["files"]:
            old = repo.files.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if f["path"] in repo.lfs else git_sha1(old))
            files.append({"path": f["path"], "uploadMode": self.upload_mode(f["path"], f["size"]),
                          "shouldIgnore": False, "oid": oid})
        h.reply(200, {"files": files, "commitOid": repo.sha})

    def lfs_batch(self, h: "_Handler", body: bytes, query: dict, pfx: str | None, repo_id: str) -> None:
        objects = []
        for o in json.loads(body)["objects"]:
            action = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.blobs:
                action["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}?sig={self.sig}", "header": {}}}
            objects.append(action)
        h.reply(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, h: "_Handler", body: bytes, query: dict, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return h.reply(400, {"error": "sha256 mismatch"})
        with self.lock:
            self.blobs[oid] = body
        h.reply(200, {})

    def commit(self, h: "_Handler", body: bytes, query: dict, type: str, repo_id: str, rev: str) -> None:
        repo = self._repo(h, type, repo_id)
        if repo is None:
            return
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        added, deleted = [], []
        with self.lock:
            for x in lines:
                v = x["value"]
                if x["key"] == "file":
                    repo.files[v["path"]] = base64.b64decode(v["content"])
                    repo.lfs.discard(v["path"])
                    added.append(v["path"])
                elif x["key"] == "lfsFile":
                    if v["oid"] not in self.blobs:
                        return h.reply(422, {"error": f"LFS object {v['oid']} of {v['path']} was never uploaded"})
                    repo.files[v["path"]] = self.blobs[v["oid"]]
                    repo.lfs.add(v["path"])
                    added.append(v["path"])
                elif x["key"] == "deletedFile":
                    repo.files.pop(v["path"], None)
                    deleted.append(v["path"])
                elif x["key"] == "deletedFolder":
                    for p in [p for p in repo.files if p.startswith(v["path"].rstrip("/") + "/")]:
                        repo.files.pop(p)
                        deleted.append(p)
            oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}{header['summary']}".encode()).hexdigest()
            repo.commits.append({"oid": oid, "summary": header["summary"], "added": added, "deleted": deleted})
        h.reply(200, {"commitUrl": f"{self.url}/{PREFIX[type]}{repo_id}/commit/{oid}", "commitOid": oid,
                      "success": True})

    def _entry(self, repo: Repo, path: str) -> dict[str, Any]:
        data = repo.files[path]
        e: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
        if path in repo.lfs:
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
        return e

    def _folders(self, repo: Repo) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in repo.files for i in range(1, p.count("/") + 1)}

    def info(self, h: "_Handler", body: bytes, query: dict, type: str, repo_id: str, rev: str | None = None) -> None:
        repo = self._repo(h, type, repo_id)
        if repo is None:
            return
        h.reply(200, {"id": repo_id, "_id": repo_id, "sha": repo.sha, "private": repo.private, "disabled": False,
                      "gated": False, "lastModified": "2026-01-01T00:00:00.000Z", "tags": [],
                      "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

    def tree(self, h: "_Handler", body: bytes, query: dict, type: str, repo_id: str, rev: str, sub: str | None) -> None:
        repo = self._repo(h, type, repo_id)
        if repo is None:
            return
        base = (sub or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        under = lambda p: p.startswith(base + "/") if base else True  # noqa: E731
        if base and not any(under(p) for p in repo.files):
            return h.reply(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
        depth = base.count("/") + 1 if base else 0
        out = [{"type": "directory", "path": d, "oid": git_sha1(d.encode())} for d in sorted(self._folders(repo))
               if under(d) and (recursive or d.count("/") == depth)]
        out += [self._entry(repo, p) for p in sorted(repo.files) if under(p) and (recursive or p.count("/") == depth)]
        h.reply(200, out)

    def paths_info(self, h: "_Handler", body: bytes, query: dict, type: str, repo_id: str, rev: str) -> None:
        repo = self._repo(h, type, repo_id)
        if repo is None:
            return
        try:
            paths = json.loads(body)["paths"]
        except ValueError:  # form-encoded: paths=a&paths=b
            paths = parse_qs(body.decode())["paths"]
        folders = self._folders(repo)
        out = [self._entry(repo, p) if p in repo.files else {"type": "directory", "path": p, "oid": git_sha1(p.encode())}
               for p in paths if p in repo.files or p in folders]
        h.reply(200, out)

    def resolve(self, h: "_Handler", body: bytes, query: dict, pfx: str | None, repo_id: str, rev: str, file: str) -> None:
        repo_type = {"datasets/": "dataset", "spaces/": "space"}.get(pfx or "", "model")
        repo = self._repo(h, repo_type, repo_id)
        if repo is None:
            return
        if file not in repo.files:
            return h.reply(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
        data = repo.files[file]
        etag = hashlib.sha256(data).hexdigest() if file in repo.lfs else git_sha1(data)
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        if file in repo.lfs:
            headers["X-Linked-Etag"], headers["X-Linked-Size"] = f'"{etag}"', str(len(data))
        h.reply(200, data, headers=headers, head=h.command == "HEAD")


class _Handler(BaseHTTPRequestHandler):
    server_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet: tests read hub.requests instead
        pass

    def reply(self, status: int, body: Any, headers: dict[str, str] | None = None, head: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self.server_hub.handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server_hub.handle(self, "HEAD")

    def do_POST(self) -> None:
        self.server_hub.handle(self, "POST")

    def do_PUT(self) -> None:
        self.server_hub.handle(self, "PUT")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--token", required=True)
    a = ap.parse_args()
    hub = FakeHub(a.token, port=a.port)
    print(f"fake hub on {hub.url}", flush=True)
    try:
        hub.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
