"""Stage 01's input from wherever it is: a local or Drive path, or an http(s) URL of `trn.json`, `trn.json.gz` or the
dataset's zip archive, downloaded once into the home's `data/raw/` (git-ignored, never committed).

    python -c "from prodtune.data.fetch import fetch_input; print(fetch_input('data/sample/trn_sample.jsonl'))"

AmazonTitles-1.3MM (`LF-AmazonTitles-1.3MM`) comes from the Extreme Classification Repository,
http://manikvarma.org/downloads/XC/XMLRepository.html; its raw archive holds `trn.json.gz`, which is what stage 01
reads. A download goes to `<name>.part` and is renamed when complete, so an interrupted one resumes (HTTP Range)
and a finished one is not fetched again.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
import zipfile
from pathlib import Path

from prodtune.io import InputError, atomic_path, home_dir, log, project_root

RAW_DIR = Path("data") / "raw"  # under the home: where downloads and archive members go
MEMBERS = ("trn.json.gz", "trn.json", "trn.jsonl")  # what stage 01 takes out of an archive, in this order
_CHUNK = 1 << 20


def is_url(spec: str | os.PathLike) -> bool:
    """True for an http(s) address."""
    return str(spec).startswith(("http://", "https://"))


def local_input(spec: str | os.PathLike) -> Path:
    """Where a local input is: as given (relative to the working folder, the project root in notebooks and the CLI),
    else under the project root (the committed sample), else under `$PRODTUNE_HOME` (`data/raw/trn.json.gz`);
    as given when none exists (reading it then names it in the error)."""
    p = Path(spec).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for base in (project_root(), home_dir()):
        if (base / p).exists():
            return base / p
    return p


def fetch_input(spec: str | os.PathLike, dest_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local `trn.json` / `.jsonl` / `.gz` file stage 01 reads, downloading and unpacking it where needed.

    Args:
        spec: a local or Drive path, or an http(s) URL, of trn.json / trn.json.gz / .jsonl or of a zip archive
            holding one (the dataset's raw zip holds `trn.json.gz`).
        dest_dir: where downloads and archive members go (default: `<home>/data/raw`).
        progress: show a progress bar while downloading.

    Returns:
        The path of the file to read: `spec` itself for a local JSON file, else a file under `dest_dir`.

    Raises:
        InputError: the download fails (the partial file is kept, a rerun resumes it) or an archive holds no trn file.
    """
    dest = Path(dest_dir) if dest_dir is not None else home_dir() / RAW_DIR
    if not is_url(spec):
        src = local_input(spec)
        return _unpack(src, dest / _unpacked_name(src.name)) if src.is_file() and zipfile.is_zipfile(src) else src
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(str(spec)).path)).name or "download"
    target, unpacked = dest / name, dest / _unpacked_name(name)
    if done := _member_in(unpacked):  # an archive fetched and unpacked before
        return done
    if not target.is_file():
        download(str(spec), target, progress)
    if zipfile.is_zipfile(target):
        member = _unpack(target, unpacked)
        target.unlink()  # the archive's other files (tst, lbl) are not used; a rerun finds the unpacked trn file
        return member
    return target


def download(url: str, target: Path, progress: bool = True) -> Path:
    """Download `url` to `target` through `target.part`, resuming a partial one (HTTP Range), with a progress bar."""
    import httpx
    from tqdm.auto import tqdm

    part = target.with_name(target.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    log.info("downloading %s -> %s%s", url, target, f" (resuming at {offset:,} bytes)" if offset else "")
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as r:
            if r.status_code == 416 and offset:  # the part file is not a prefix the server recognises: start over
                part.unlink()
                return download(url, target, progress)
            if r.status_code not in (200, 206):
                raise InputError(f"{url}: HTTP {r.status_code} {r.reason_phrase}")
            if r.status_code == 200:  # the server ignored the Range header: start over
                offset = 0
            length = r.headers.get("Content-Length")
            total = offset + int(length) if length else None
            with open(part, "ab" if offset else "wb") as fh, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                    disable=not progress) as bar:
                for chunk in r.iter_raw():  # as they arrive (a drop keeps them), as served (a .gz stays compressed)
                    fh.write(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as e:
        raise InputError(f"{url}: download failed ({e}); run again to resume from {part}") from e
    size = part.stat().st_size
    if total is not None and size != total:
        raise InputError(f"{url}: got {size:,} of {total:,} bytes; run again to resume from {part}")
    os.replace(part, target)
    return target


def _unpacked_name(name: str) -> str:
    return name[: -len(".zip")] if name.lower().endswith(".zip") else name + ".unzipped"


def _member_in(folder: Path) -> Path | None:
    return next((folder / m for m in MEMBERS if (folder / m).is_file()), None)


def _unpack(archive: Path, folder: Path) -> Path:
    """Take the trn file (`MEMBERS`, first found) out of a zip archive into `folder`, atomically; reuse it if there."""
    if done := _member_in(folder):
        return done
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        member = next((n for m in MEMBERS for n in sorted(names) if Path(n).name == m), None)
        if member is None:
            held = ", ".join(names[:8]) or "nothing"
            raise InputError(f"{archive}: no {' / '.join(MEMBERS)} inside (it holds {held})")
        log.info("unpacking %s from %s -> %s", member, archive, folder)
        with zf.open(member) as src, atomic_path(folder / Path(member).name) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    return folder / Path(member).name
