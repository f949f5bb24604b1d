"""Resumable, verified downloads: COCO zips, the Karpathy split, CLIP / PAC-S / DiCO weights.

    dico download file --url URL --out PATH [--sha256 HEX]
    dico download zip  --url URL --archive ZIP --out DIR_OR_FILE [--member NAME] [--sha256 HEX]

How a file arrives, and why:
- Bytes go to `<out>.part`. A cut connection leaves the part on disk and the next attempt (or the
  next Snakemake retry) asks for the rest with an HTTP Range header. A server that ignores Range
  answers 200 with the whole file: the part is then restarted from zero, never appended to.
- The size is checked against Content-Length / Content-Range, and the sha256 against the pinned
  value. Without a pin, the first download's sha256 is recorded in `<out>.sha256` (trust on first
  use) and later downloads must match it. A mismatch deletes the part and fetches again, a bounded
  number of times.
- Where the server publishes a checksum beside the file (Maven Central's `<file>.sha1`), `--sha1-url`
  reads it first and the part must match it too: a check that needs no pin in the config.
- Only a verified part is renamed onto `<out>` (atomic on POSIX): a file at `<out>` is complete.
- Google Drive answers large files with a "can't scan for viruses" HTML page instead of the bytes;
  its form (or, on older pages, a link) carries the confirm token. We follow it. Any other HTML page
  where a file was expected is an error, never written to disk as if it were the file.
- stdlib urllib only: the data env needs no HTTP client (tqdm draws the progress bar).
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import time
import zipfile
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urlencode, urljoin
from urllib.request import HTTPCookieProcessor, Request, build_opener

from .io import atomic_path, file_digests

log = logging.getLogger("dico")

CHUNK = 1 << 20
USER_AGENT = "dico-download/1 (python urllib)"
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
STATUS_HINTS = {
    403: "access denied: the link may need permission or the file was moved",
    404: "not found: the URL may have moved",
    429: "rate-limited (Google Drive has a daily download quota per file): try again later",
}


class DownloadError(RuntimeError):
    pass


class _Retry(Exception):
    """A transfer that stopped early but can go on (the .part file keeps what arrived)."""


# -- sha256 ----------------------------------------------------------------------------------------
def sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded at the first download of `path` (sha256sum format), if any."""
    try:
        return sidecar(path).read_text().split()[0].lower()
    except (FileNotFoundError, IndexError):
        return None


def _record_sha256(path: Path, digest: str) -> None:
    with atomic_path(sidecar(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")


# -- Google Drive's confirmation page -------------------------------------------------------------
class _Forms(HTMLParser):
    """Collects <form action method> with their <input name value>, and <a href> targets."""

    def __init__(self):
        super().__init__()
        self.forms: list[dict] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get").lower(),
                               "id": a.get("id", ""), "inputs": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["inputs"][a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])


def confirm_url(page: str, base: str) -> str | None:
    """Where Drive's "download anyway" button leads, or None if `page` has no such button.

    Current pages (2024-) hold <form id="download-form" action=".../download" method="get"> with
    hidden inputs id, export, confirm and uuid; older ones a link `...uc?export=download&confirm=
    TOKEN&id=...` (plus a download_warning cookie, which the opener's cookie jar keeps).
    """
    parser = _Forms()
    parser.feed(page)
    for form in parser.forms:
        if form["method"] == "get" and ("confirm" in form["inputs"] or form["id"] == "download-form"):
            return urljoin(base, form["action"] or base) + "?" + urlencode(form["inputs"])
    for href in parser.links:
        if "confirm=" in href:
            return urljoin(base, href)
    return None


# -- one transfer ----------------------------------------------------------------------------------
def _request(opener, url: str, start: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return opener.open(Request(url, headers=headers), timeout=timeout)


def _is_html(resp) -> bool:
    return resp.headers.get_content_type() in ("text/html", "application/xhtml+xml")


def _open(opener, url: str, start: int, timeout: float, dest: Path):
    """The response that carries the file's bytes, after any Drive confirmation page."""
    for _ in range(3):  # page -> file; one spare hop in case Drive chains pages
        resp = _request(opener, url, start, timeout)
        if not _is_html(resp):
            return resp
        page = resp.read(1 << 20).decode("utf-8", errors="replace")
        resp.close()
        nxt = confirm_url(page, resp.geturl())
        if nxt is None:
            raise DownloadError(
                f"{url} answered with an HTML page instead of the file (quota exceeded, no permission or a "
                f"moved link?). Open the URL in a browser, download the file by hand and put it at {dest}")
        log.info("following the download confirmation page of %s", url)
        url = nxt
    raise DownloadError(f"{url}: still an HTML page after following the confirmation; download the file by "
                        f"hand and put it at {dest}")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-999/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); '/*' -> total None."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = None if span.strip() == "*" else int(span.split("-")[0])
    return first, (None if total.strip() in ("", "*") else int(total))


def _transfer(opener, url: str, part: Path, dest: Path, timeout: float, progress: bool) -> None:
    """Append the missing bytes to `part` (or restart it); raise _Retry if the stream ends early."""
    from tqdm import tqdm

    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(opener, url, start, timeout, dest)
    except HTTPError as e:
        if e.code != 416:
            raise
        _, total = _content_range(e.headers.get("Content-Range"))
        if total is not None and start == total:
            return  # the part already holds the whole file
        part.unlink(missing_ok=True)  # longer than the file: not a prefix of it
        raise _Retry(f"range {start}- not satisfiable (file has {total} bytes); restarting") from None
    with resp:
        if resp.status == 206:
            first, total = _content_range(resp.headers.get("Content-Range"))
            if first != start:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {first}, not {start}; restarting")
            mode = "ab"
        else:  # 200: the whole file, whatever we asked for
            if start:
                log.info("%s ignored the Range request: restarting from byte 0", url)
            start, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=dest.name, disable=not progress,
                                         mininterval=1.0) as bar:
            while block := resp.read(CHUNK):
                f.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retry(f"connection closed after {size:,} of {total:,} bytes")
    if total is not None and size > total:
        part.unlink()
        raise _Retry(f"received {size:,} bytes, more than the announced {total:,}; restarting")


def published_sha1(url: str, *, retries: int = 5, timeout: float = 60.0, backoff: float = 2.0) -> str:
    """The sha1 a repository publishes beside an artifact (`<artifact>.sha1`: the hex digest, optionally
    followed by the file name, as Maven Central writes it)."""
    import re

    opener, last = build_opener(), "no attempt"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        try:
            with _request(opener, url, 0, timeout) as resp:
                text = resp.read(4096).decode("ascii", errors="replace")
        except HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code not in RETRYABLE_STATUS:
                break
            continue
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
            continue
        m = re.match(r"\s*([0-9a-fA-F]{40})\b", text)
        if not m:
            raise DownloadError(f"{url}: expected a sha1 (40 hex digits) first, got {text[:80]!r}")
        return m.group(1).lower()
    raise DownloadError(f"could not read the published checksum {url}: {last}. Check the URL, or pin the "
                        "file's sha256 in the config instead")


def _fail(url: str, dest: Path, what: str) -> DownloadError:
    return DownloadError(f"download of {url} failed: {what}. Download it by hand and put it at {dest}")


# -- the public entry points -----------------------------------------------------------------------
def fetch(url: str, dest: str | os.PathLike, sha256: str | None = None, *, retries: int = 5,
          timeout: float = 60.0, backoff: float = 2.0, progress: bool = True, force: bool = False,
          sha1: str | None = None) -> str | None:
    """Download `url` to `dest` (resumable, size- and sha256-checked, atomic). Returns the sha256,
    or None when `dest` already exists (nothing is fetched then, unless `force`).

    `sha256=None`: the sha recorded at the first download (`<dest>.sha256`) is expected if there is
    one; otherwise the new file's sha is recorded there. `sha1`: a digest the file must match as
    well (the one its repository publishes: `published_sha1`). `retries`: extra attempts after
    network errors (each resumes the .part) and after sha mismatches (each refetches from zero).
    """
    dest = Path(dest)
    if dest.exists() and not force:
        log.info("%s exists: not downloading it again", dest)
        return None
    expected = (sha256 or recorded_sha256(dest) or "").lower() or None
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = build_opener(HTTPCookieProcessor(CookieJar()))  # Drive's older flow sets a cookie
    last = "no attempt"
    for attempt in range(retries + 1):
        if attempt:
            log.warning("%s: %s; attempt %d of %d", dest.name, last, attempt + 1, retries + 1)
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        try:
            _transfer(opener, url, part, dest, timeout, progress)
        except HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code not in RETRYABLE_STATUS:
                raise _fail(url, dest, f"{last} ({STATUS_HINTS.get(e.code, 'not retryable')})") from None
            continue
        except _Retry as e:
            last = str(e)
            continue
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, refused, truncated chunk
            last = f"{type(e).__name__}: {e}"
            continue
        digests = file_digests(part, "sha256", *(["sha1"] if sha1 else []))  # one read for both
        digest = digests["sha256"]
        if expected and digest != expected:
            part.unlink()
            last = f"sha256 mismatch (got {digest}, expected {expected}); the file was deleted"
            continue
        if sha1 and (got := digests["sha1"]) != sha1.lower():
            part.unlink()
            last = f"sha1 mismatch with the published checksum (got {got}, expected {sha1}); the file was deleted"
            continue
        os.replace(part, dest)
        if not expected:
            _record_sha256(dest, digest)
            log.info("%s: sha256 %s recorded in %s (pin it in the config to check later downloads)",
                     dest, digest, sidecar(dest))
        log.info("%s: %s bytes, sha256 %s", dest, f"{dest.stat().st_size:,}", digest)
        return digest
    hint = ""
    if expected and not sha256:
        hint = f" (expected the sha256 recorded in {sidecar(dest)}; delete that file if the upstream file changed)"
    raise _fail(url, dest, f"giving up after {retries + 1} attempts, last: {last}{hint}")


def _safe_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Refuse members that would land outside the extraction folder (absolute or ../ paths)."""
    for info in zf.infolist():
        p = Path(info.filename)
        if p.is_absolute() or ".." in p.parts:
            raise DownloadError(f"{zf.filename}: unsafe path in archive: {info.filename!r}")
    return zf.infolist()


def extract_zip(archive: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> Path:
    """Unpack `archive` into the folder `out`, atomically: everything goes to a hidden sibling
    folder first, which is renamed onto `out` only when complete. A zip whose entries all sit in
    one top folder named like `out` (COCO's train2014.zip holds train2014/...) is not nested twice.
    """
    from tqdm import tqdm

    out = Path(out)
    if out.exists():
        if any(out.iterdir()):
            raise DownloadError(f"{out} exists and is not empty: remove it, or point the config at it")
        out.rmdir()
    tmp = out.with_name(f".{out.name}.partial")  # fixed name: a killed extraction is cleaned up here
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _safe_members(zf)
            for info in tqdm(members, desc=f"unzip {Path(archive).name}", unit="file", disable=not progress,
                             mininterval=1.0):
                zf.extract(info, tmp)
        tops = {Path(i.filename).parts[0] for i in members if i.filename.strip("/")}
        src = tmp / out.name if tops == {out.name} and (tmp / out.name).is_dir() else tmp
        os.replace(src, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def extract_member(archive: str | os.PathLike, member: str, out: str | os.PathLike) -> Path:
    """Write the one entry of `archive` whose file name is `member` (in any folder) to `out`."""
    with zipfile.ZipFile(archive) as zf:
        hits = [i for i in _safe_members(zf) if Path(i.filename).name == member and not i.is_dir()]
        if len(hits) != 1:
            raise DownloadError(f"{archive}: expected one entry named {member!r}, found "
                                f"{[i.filename for i in hits] or 'none'}")
        with atomic_path(out) as tmp, zf.open(hits[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    return Path(out)


def fetch_zip(url: str, archive: str | os.PathLike, out: str | os.PathLike, *, member: str | None = None,
              sha256: str | None = None, keep_archive: bool = False, progress: bool = True, **kw) -> Path:
    """Download the zip `url` to `archive` (as `fetch`) and unpack it into `out`: the whole archive
    as a folder, or only the entry `member` as a file. The archive is deleted afterwards unless
    `keep_archive`; its sha256 record (`<archive>.sha256`) stays."""
    out, archive = Path(out), Path(archive)
    if out.exists() and (member or any(out.iterdir())):
        log.info("%s exists: not downloading it again", out)
        return out
    fetch(url, archive, sha256, progress=progress, **kw)
    if not zipfile.is_zipfile(archive):
        raise DownloadError(f"{archive} (from {url}) is not a zip archive; delete it and its .sha256 and retry, "
                            f"or download it by hand")
    if member:
        extract_member(archive, member, out)
    else:
        extract_zip(archive, out, progress=progress)
    if not keep_archive:
        archive.unlink()
    log.info("%s ready (from %s)", out, url)
    return out


# -- the arguments of `dico download` as the download rules pass them ------------------------------
class Untracked:
    """A rule param that reaches the shell command but not Snakemake's provenance record (which keeps
    builtin-typed params only): editing a download's URL, pinning its sha256 or changing retries in
    the config must not re-download a file that exists, nor rerun everything built from it."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self):
        return self.text


def command_args(url: str, sha256: str | None = None, *, retries: int, timeout: float, **extra) -> Untracked:
    """`dico download` arguments: source, checks and transfer settings, then `extra` as flags
    (archive="x.zip" -> --archive x.zip, keep_archive=True -> --keep-archive; None and False leave
    the flag out)."""
    import shlex

    args = [f"--url {shlex.quote(url)}", f"--retries {retries}", f"--timeout {timeout}"]
    if sha256:
        args.append(f"--sha256 {shlex.quote(sha256)}")
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args.append(f"{flag} {shlex.quote(str(value))}")
    return Untracked(" ".join(args))
