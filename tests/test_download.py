"""dico.download against a loopback HTTP server: resume, Range ignored, corruption, sha256 records,
Google Drive's confirmation page, atomic unzip, and Snakemake not downloading what exists."""
import hashlib
import io
import os
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from dico import download as D
from worlds import copy_workflow

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 1200  # 300 KiB, cut points land mid-stream
SHA = hashlib.sha256(PAYLOAD).hexdigest()

DRIVE_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<div class="uc-main"><p class="uc-warning-caption">Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" id="uc-download-link" class="jfk-button jfk-button-action" value="Download anyway"/>
<input type="hidden" name="id" value="FILEID"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="0f1e-2d3c">
</form></div></body></html>"""


class Handler(BaseHTTPRequestHandler):
    """Serves state["files"]; state knobs: cut_after (bytes, once), ignore_range, corrupt (count)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        st = self.server.state
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        st["requests"].append({"path": url.path, "query": query, "range": self.headers.get("Range")})
        if url.path == "/drive/uc":  # the small page first; the bytes only via its form
            page = DRIVE_PAGE.format(action=f"http://127.0.0.1:{self.server.server_port}/drive/download")
            return self._reply(200, page.encode(), "text/html; charset=utf-8")
        if url.path == "/drive/download" and (query.get("confirm") != ["t"] or query.get("uuid") != ["0f1e-2d3c"]):
            return self._reply(403, b"no", "text/plain")
        body = st["files"].get(url.path)
        if body is None:
            return self._reply(404, b"not here", "text/plain")
        if st["corrupt"]:
            st["corrupt"] -= 1
            body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
        start, headers = 0, {}
        rng = self.headers.get("Range")
        if rng and not st["ignore_range"]:
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(body):
                return self._reply(416, b"", "text/plain", {"Content-Range": f"bytes */{len(body)}"})
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        data = body[start:]
        cut = st.pop("cut_after", None)
        self._reply(206 if start else 200, data[:cut] if cut else data, "application/zip", headers,
                    length=len(data))  # a cut: Content-Length promises more than is sent

    def _reply(self, status, data, ctype, headers=None, length=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.state = {"files": {"/f.bin": PAYLOAD, "/drive/download": PAYLOAD}, "requests": [],
                 "ignore_range": False, "corrupt": 0}
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(url, dest, **kw):
    return D.fetch(url, dest, progress=False, backoff=0, timeout=10, **kw)


def test_cut_connection_resumes_with_range(server, tmp_path):
    server.state["cut_after"] = 100_000
    dest = tmp_path / "w" / "f.bin"
    assert fetch(server.url + "/f.bin", dest, sha256=SHA) == SHA
    assert dest.read_bytes() == PAYLOAD and not dest.with_name("f.bin.part").exists()
    assert [r["range"] for r in server.state["requests"]] == [None, "bytes=100000-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.state.update(cut_after=100_000, ignore_range=True)
    dest = tmp_path / "f.bin"
    fetch(server.url + "/f.bin", dest, sha256=SHA)
    assert dest.read_bytes() == PAYLOAD  # not 100 kB of prefix + the whole file
    assert len(server.state["requests"]) == 2


def test_corrupted_download_is_deleted_and_fetched_again(server, tmp_path):
    server.state["corrupt"] = 1
    dest = tmp_path / "f.bin"
    fetch(server.url + "/f.bin", dest, sha256=SHA)
    assert dest.read_bytes() == PAYLOAD and len(server.state["requests"]) == 2

    server.state["corrupt"] = 99  # bounded: gives up, leaves nothing that looks like the file
    bad = tmp_path / "g.bin"
    with pytest.raises(D.DownloadError, match=r"sha256 mismatch.*by hand and put it at .*g\.bin"):
        fetch(server.url + "/f.bin", bad, sha256=SHA, retries=2)
    assert not bad.exists() and not bad.with_name("g.bin.part").exists()


def test_sha256_recorded_on_first_download_then_enforced(server, tmp_path):
    dest = tmp_path / "f.bin"
    assert fetch(server.url + "/f.bin", dest) == SHA
    assert D.recorded_sha256(dest) == SHA and D.sidecar(dest).read_text() == f"{SHA}  f.bin\n"
    assert fetch(server.url + "/f.bin", dest) is None  # exists: no request
    assert len(server.state["requests"]) == 1

    dest.unlink()  # the upstream file changes under the same URL: the record catches it
    server.state["files"]["/f.bin"] = PAYLOAD[::-1]
    with pytest.raises(D.DownloadError, match="sha256 mismatch"):
        fetch(server.url + "/f.bin", dest, retries=0)


def test_google_drive_confirmation_page_is_followed(server, tmp_path):
    dest = tmp_path / "pac.pth"
    fetch(server.url + "/drive/uc?export=download&id=FILEID", dest, sha256=SHA)
    assert dest.read_bytes() == PAYLOAD
    page, file = server.state["requests"]
    assert page["path"] == "/drive/uc" and file["path"] == "/drive/download"
    assert file["query"] == {"id": ["FILEID"], "export": ["download"], "confirm": ["t"], "uuid": ["0f1e-2d3c"]}


def test_confirm_url_old_link_format_and_pages_without_one():
    old = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=Ab1_&amp;id=XYZ">Download anyway</a>'
    assert D.confirm_url(old, "https://drive.google.com/uc?id=XYZ") == \
        "https://drive.google.com/uc?export=download&confirm=Ab1_&id=XYZ"
    assert D.confirm_url("<html><body>Quota exceeded</body></html>", "https://x/") is None


def test_errors_name_the_url_status_and_what_to_do(server, tmp_path):
    server.state["files"]["/page.html"] = b""
    with pytest.raises(D.DownloadError, match=r"404 .*by hand and put it at"):
        fetch(server.url + "/missing.zip", tmp_path / "m.zip")
    assert len(server.state["requests"]) == 1  # a 404 is not retried


def test_html_instead_of_file_is_an_error(server, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "confirm_url", lambda page, base: None)  # e.g. Drive's quota page
    with pytest.raises(D.DownloadError, match=r"HTML page instead of the file.*x\.pth"):
        fetch(server.url + "/drive/uc?id=FILEID", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth.part").exists()


def _zip(entries: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_is_unpacked_atomically(server, tmp_path, monkeypatch):
    server.state["files"]["/train2014.zip"] = _zip({f"train2014/COCO_train2014_{i:012d}.jpg": b"jpg" * i
                                                    for i in range(1, 6)})
    out, archive = tmp_path / "images" / "train2014", tmp_path / "dl" / "train2014.zip"

    calls = []
    real_extract = zipfile.ZipFile.extract

    def dies_after_two(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) > 2:
            raise OSError("disk full")
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", dies_after_two)
    with pytest.raises(OSError, match="disk full"):
        D.fetch_zip(server.url + "/train2014.zip", archive, out, progress=False, backoff=0)
    assert not out.exists() and os.listdir(out.parent) == []  # no half folder, no temp left
    monkeypatch.undo()

    D.fetch_zip(server.url + "/train2014.zip", archive, out, progress=False, backoff=0)
    assert sorted(p.name for p in out.iterdir()) == [f"COCO_train2014_{i:012d}.jpg" for i in range(1, 6)]
    assert not archive.exists() and D.recorded_sha256(archive)  # zip gone, its sha256 kept
    assert len(server.state["requests"]) == 1  # the zip kept from the failed unpack was reused


def test_zip_member_extraction(server, tmp_path):
    server.state["files"]["/caption_datasets.zip"] = _zip({"dataset_coco.json": b'{"images": []}',
                                                           "dataset_flickr8k.json": b"{}"})
    out = tmp_path / "coco" / "dataset_coco.json"
    D.fetch_zip(server.url + "/caption_datasets.zip", tmp_path / "dl" / "c.zip", out, member="dataset_coco.json",
                progress=False)
    assert out.read_bytes() == b'{"images": []}' and os.listdir(out.parent) == ["dataset_coco.json"]


def test_cli_download_file(server, tmp_path):
    from dico.cli import main

    out = tmp_path / "f.bin"
    assert main(["download", "file", "--url", server.url + "/f.bin", "--out", str(out), "--sha256", SHA,
                 "--no-progress"]) == 0
    assert out.read_bytes() == PAYLOAD
    assert main(["download", "file", "--url", server.url + "/nope", "--out", str(tmp_path / "n"),
                 "--no-progress"]) == 1


# -- Snakemake: a file that exists is never downloaded; editing its url/sha256 reruns nothing -------
def _workflow(tmp_path: Path, models: dict) -> Path:
    wf = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for name, model in models.items():
        config["clip_models"][name] = {"source": "file", "format": "openai", **model}
    (wf / "test.yaml").write_text(yaml.safe_dump(config))
    return wf


def _snakemake(wf: Path, *args) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["snakemake", "--configfile", "test.yaml", "--cores", "1", *args], cwd=wf, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_snakemake_downloads_only_what_is_missing(server, tmp_path):
    wf = _workflow(tmp_path, {"have": {"path": "weights/have.pt", "url": server.url + "/gone.pt"},
                              "miss": {"path": "weights/miss.pt", "url": server.url + "/f.bin"}})
    (wf / "weights").mkdir()
    (wf / "weights" / "have.pt").write_bytes(b"a copy the user already has")
    log = _snakemake(wf, "weights/have.pt", "weights/miss.pt")
    assert "download_miss" in log and "download_have" not in log
    assert (wf / "weights" / "have.pt").read_bytes() == b"a copy the user already has"
    assert (wf / "weights" / "miss.pt").read_bytes() == PAYLOAD
    assert (wf / "results" / "logs" / "download" / "miss.log").exists()
    assert [r["path"] for r in server.state["requests"]] == ["/f.bin"]

    # pinning the recorded sha256 and moving the URLs must not redo a download or its consumers
    config = yaml.safe_load((wf / "test.yaml").read_text())
    for name in ("have", "miss"):
        config["clip_models"][name].update(sha256=SHA, url=server.url + "/moved.bin")
    (wf / "test.yaml").write_text(yaml.safe_dump(config))
    assert "Nothing to be done" in _snakemake(wf, "-n", "weights/have.pt", "weights/miss.pt")
