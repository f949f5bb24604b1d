"""`dico doctor`: the rows against independent references (NVIDIA's driver floors written down here,
hashlib, statvfs, `java -version`), and the command itself on the demo, on the paper's SLURM profile
and with a fake `nvidia-smi` that reports an old driver (GPUs and NCCL cannot run here: the CUDA rows
are driven through the driver version nvidia-smi reports, which is all the check reads)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dico import config as C
from dico import doctor as D

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("2.14.1", "0.29.1")
# NVIDIA's minimum driver of each CUDA major family (CUDA minor version compatibility), written down
# here independently of dico.doctor
FLOORS = {"13.0": 580, "13.2": 580, "12.6": 525, "12.8": 525, "11.8": 450}


def _workdir(tmp_path: Path) -> Path:
    """A checkout's config/ and slurm/ in a folder of their own: results/ and resources/ start empty."""
    work = tmp_path / "work"
    for folder in ("config", "slurm"):
        shutil.copytree(ROOT / folder, work / folder)
    return work


def _doctor(cwd: Path, *args: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "dico", "doctor", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _rows(out: str) -> dict[str, dict[str, str]]:
    """The table read back: {check: {needed, found, status}}, wrapped cells joined (columns start where
    the header's words do)."""
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("check "))
    starts = [lines[top].index(h) for h in ("check", "needed", "found", "status")] + [None]
    rows, cur = {}, None
    for line in lines[top + 2:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:])]
        if cells[0]:
            cur = rows.setdefault(cells[0], {"needed": "", "found": "", "status": ""})
        for key, cell in zip(("needed", "found", "status"), cells[1:]):
            cur[key] = f"{cur[key]} {cell}".strip() if cell else cur[key]
    return rows


def _status(out: str, name: str) -> str:
    rows = _rows(out)
    assert name in rows, f"no row {name!r} in:\n{out}"
    return rows[name]["status"]


def _fix(out: str, name: str) -> str:
    m = re.search(rf"^  \d+\. {re.escape(name)}: (.*)$", out, re.M)
    assert m, f"no fix for {name!r} in:\n{out}"
    return m.group(1)


def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return folder


# -- torch's CUDA build against the driver -------------------------------------------------------------
def test_cuda_build_row_follows_nvidias_driver_floors():
    for cuda, floor in FLOORS.items():
        for major in range(440, 700, 5):
            row = D.cuda_build_row(cuda, {"driver": f"{major}.10.01", "gpus": [("GPU", 80.0)]}, "required", VERSIONS)
            assert (row.status == "ok") == (major >= floor), (cuda, major, row)


@pytest.mark.parametrize("cuda, driver, status, fix", [
    ("13.0", "535.104.05", "FAIL", "pip install torch==2.14.1+cu126 torchvision==0.29.1+cu126 "
                                   "--index-url https://download.pytorch.org/whl/cu126"),
    ("13.0", "579.99", "FAIL", "--index-url https://download.pytorch.org/whl/cu126"),
    ("13.0", "520.61.05", "FAIL", "upgrade the NVIDIA driver to >= 525"),
    (None, "590.48.01", "FAIL", "pip install torch==2.14.1+cu130 torchvision==0.29.1+cu130 "
                                "--index-url https://download.pytorch.org/whl/cu130"),
    (None, "535.104.05", "FAIL", "whl/cu126"),
    ("12.6", "535.104.05", "ok", ""),
    ("13.0", "580.65.06", "ok", ""),
])
def test_cuda_build_row_names_the_build_the_driver_runs(cuda, driver, status, fix):
    row = D.cuda_build_row(cuda, {"driver": driver, "gpus": [("A100", 80.0)]}, "optional", VERSIONS)
    assert row.status == status and fix in row.fix and (status == "ok") == (row.fix == ""), row


def test_cuda_build_row_without_a_driver():
    none = D.cuda_build_row("13.0", None, "optional", VERSIONS)
    assert none.status == "skip" and "runs on the CPU" in none.found
    need = D.cuda_build_row("13.0", None, "required", VERSIONS)
    assert need.status == "FAIL" and "nvidia-smi not on PATH" in need.found and "GPU node" in need.fix
    broken = D.cuda_build_row("13.0", {"error": "nvidia-smi exited 9: couldn't communicate with the driver"},
                              "required", VERSIONS)
    assert broken.status == "FAIL" and "couldn't communicate" in broken.found
    assert D.cuda_build_row("13.0", None, "no", VERSIONS).status == "skip"


def test_gpu_row_against_what_the_config_and_profile_ask():
    h100 = [("NVIDIA H100 80GB HBM3", 79.1)]
    assert D.gpu_row("required", 1, None, None, h100).status == "ok"
    short = D.gpu_row("required", 2, {"executor": "slurm"}, None, h100)  # SLURM gives jobs their own nodes
    assert short.status == "warn" and "fewer than the 2 a job asks for" in short.found
    assert D.gpu_row("required", 2, {"executor": "local"}, None, h100).status == "ok"  # a workstation caps the counts
    unseen = D.gpu_row("optional", 0, None, {"driver": "535.1", "gpus": h100}, [])
    assert unseen.status == "FAIL" and "torch sees none" in unseen.found
    assert D.gpu_row("optional", 0, None, None, []).status == "skip"
    assert D.gpu_row("required", 0, None, None, []).status == "FAIL"
    assert D.gpu_row("no", 0, None, None, h100).status == "skip"


# -- downloads, disk, Java, the process group ------------------------------------------------------------
def test_download_rows_check_presence_and_sha256(tmp_path):
    data = bytes(range(256)) * 64
    weights = tmp_path / "ViT-L-14.pt"
    digest = hashlib.sha256(data).hexdigest()
    config = C.load(ROOT / "config" / "paper.yaml", {"clip_models": {"clip_l14": {"path": str(weights), "sha256": digest}}})
    d = next(x for x in C.downloads(config) if x["name"] == "clip_l14")
    missing = D.download_row(d)
    assert missing.status == "FAIL" and "download_clip_l14" in missing.fix
    weights.write_bytes(data)
    assert D.download_row(d).status == "ok" and "sha256 ok" in D.download_row(d).found
    wrong = {**d, "sha256": "0" * 64}
    assert D.download_row(wrong).status == "FAIL" and str(weights) in D.download_row(wrong).fix
    assert D.download_row(wrong, quick=True).status == "ok"  # --quick does not hash
    unpinned = {**d, "sha256": None}
    assert "no sha256" in D.download_row(unpinned).found
    (tmp_path / "ViT-L-14.pt.sha256").write_text(f"{digest}  ViT-L-14.pt\n")  # as dico.download records it
    assert D.download_row(unpinned).status == "ok"
    (tmp_path / "ViT-L-14.pt.sha256").write_text(f"{'f' * 64}  ViT-L-14.pt\n")
    row = D.download_row(unpinned)
    assert row.status == "FAIL" and "ViT-L-14.pt.sha256" in row.needed


def test_unpacked_zip_is_present_and_its_recorded_sha256_agrees_with_the_pin(tmp_path):
    d = {"name": "coco_val2014", "out": str(tmp_path / "val2014"), "folder": True, "kind": "zip", "url": "u",
         "sha256": "a" * 64, "options": {"archive": str(tmp_path / "val2014.zip")}}
    assert D.download_row(d).status == "FAIL"
    (tmp_path / "val2014").mkdir()
    assert D.download_row(d).status == "FAIL"  # an empty folder is not the images
    (tmp_path / "val2014" / "x.jpg").write_bytes(b"jpg")
    assert D.download_row(d).status == "ok"
    (tmp_path / "val2014.zip.sha256").write_text(f"{'b' * 64}  val2014.zip\n")
    assert D.download_row(d).status == "FAIL"


def test_disk_rows_against_statvfs(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize / 1e9
    config = {"data": {"source": "demo"}}
    rows = D.disk_rows(config, tmp_path, {"results": free * 0.5, "resources": free * 0.4})
    assert [r.status for r in rows] == ["ok"] and rows[0].name == "disk results/ + resources/"
    assert D.disk_rows(config, tmp_path, {"results": free * 0.6, "resources": free * 0.6})[0].status == "FAIL"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "features.bin").write_bytes(b"\0" * 2_000_000)  # already written: needs no room
    row = D.disk_rows(config, tmp_path, {"results": 0.002})[0]
    assert row.needed.startswith("0.0 GB free") and row.status == "ok"


def test_java_row_reads_the_version_java_prints(tmp_path, monkeypatch):
    if shutil.which("java") is None:
        pytest.skip("no java here")
    said = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    major = said.split('"')[1].split(".")
    major = int(major[1] if major[0] == "1" else major[0])
    row = D.java_row()
    assert row.status == ("ok" if major >= 8 else "FAIL") and f"Java {major} " in row.found
    old = _script(tmp_path / "old", "java", 'echo \'openjdk version "1.7.0_80"\' >&2\n')
    monkeypatch.setenv("PATH", str(old))
    assert D.java_row().status == "FAIL" and "Java 7" in D.java_row().found
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert D.java_row().status == "FAIL" and D.java_row().found == "not on PATH"


def test_one_process_group_runs_on_the_cpu():
    row = D.process_group_row([], "optional")
    assert row.status == "ok" and row.found.startswith("gloo: 1-process all_reduce ok") and "NCCL not tried" in row.found


# -- SLURM ---------------------------------------------------------------------------------------------
def test_slurm_profile_placeholders_and_sinfo(tmp_path, monkeypatch):
    path, profile = D.read_profile(ROOT / "slurm")
    gpu_rules = D.job_gpus(C.load(ROOT / "config" / "paper.yaml"), profile)
    assert gpu_rules["train_dico"] == 2 and gpu_rules["evaluate"] == 1
    monkeypatch.setenv("PATH", str(_script(tmp_path / "bin", "sinfo", 'printf "cpu*\\ngpu\\n"\n')))
    rows = {r.name: r for r in D.slurm_rows(profile, path, gpu_rules)}
    assert rows["SLURM sinfo"].status == "ok" and rows["SLURM sinfo"].found == "partitions cpu, gpu"
    assert rows["SLURM account"].status == "FAIL" and str(path) in rows["SLURM account"].fix
    assert rows["SLURM partitions"].status == "FAIL" and "train_dico" in rows["SLURM partitions"].found
    profile["default-resources"]["slurm_account"] = "proj42"
    for rule in gpu_rules:
        profile["set-resources"].setdefault(rule, {})["slurm_partition"] = "gpu"
    assert all(r.ok for r in D.slurm_rows(profile, path, gpu_rules))
    profile["set-resources"]["train_dico"]["slurm_partition"] = "gpux"
    assert "gpux" in {r.name: r for r in D.slurm_rows(profile, path, gpu_rules)}["SLURM partitions"].found
    profile["default-resources"]["slurm_account"] = "myaccount"  # the commented placeholder
    assert {r.name: r for r in D.slurm_rows(profile, path, gpu_rules)}["SLURM account"].status == "FAIL"
    _script(tmp_path / "bin", "sinfo", 'echo "slurm_load_partitions: Unable to contact slurm controller" >&2; exit 1\n')
    assert D.slurm_rows(profile, path, gpu_rules)[0].status == "FAIL"


# -- the command -----------------------------------------------------------------------------------------
def test_demo_config_passes(tmp_path):
    out = _doctor(_workdir(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("Java", "process group", "disk results/ + resources/"):
        assert _status(out.stdout, row) == "ok", out.stdout
    assert _status(out.stdout, "downloads") == "skip" and "checks passed" in out.stdout


def test_paper_profile_lists_what_is_missing(tmp_path):
    out = _doctor(_workdir(tmp_path), "--profile", "slurm", "--quick")
    text = out.stdout
    assert out.returncode == 1, text + out.stderr
    assert "config config/paper.yaml, profile slurm/profile.yaml" in text
    for name in ("clip_l14", "clip", "pac", "karpathy", "coco_train2014", "coco_val2014"):
        assert _status(text, f"download {name}") == "FAIL"
        assert _fix(text, f"download {name}") == f"snakemake --profile slurm download_{name}"
    jar_rules = [d["name"] for d in C.downloads(C.load(ROOT / "config" / "paper.yaml"))
                 if d["out"].startswith("resources/spice/")]
    assert _status(text, "SPICE jars") == "FAIL"  # the fix: their download rules where the config has them
    assert all(f"download_{r}" in _fix(text, "SPICE jars") for r in jar_rules) if jar_rules \
        else "resources/spice" in _fix(text, "SPICE jars")
    assert _status(text, "images flickr30k_test") == "FAIL"
    assert _status(text, "SLURM account") == "FAIL" and "slurm/profile.yaml" in _fix(text, "SLURM account")
    assert _status(text, "SLURM partitions") == "FAIL" and "train_dico" in text
    disk = _rows(text)["disk results/ + resources/"]
    assert "results/ 90 GB" in disk["needed"] and "resources/ 40 GB" in disk["needed"]
    if shutil.which("nvidia-smi") is None:  # this machine: no driver, where the paper needs a GPU
        assert _status(text, "torch CUDA build") == "FAIL" and "GPU node" in _fix(text, "torch CUDA build")
        assert _status(text, "GPUs") == "FAIL"


def test_fake_nvidia_smi_with_an_old_driver_gives_the_mismatch_and_its_fix(tmp_path):
    import torch

    fake = _script(tmp_path / "bin", "nvidia-smi", 'echo "535.104.05, NVIDIA A100-SXM4-80GB, 81920"\n')
    out = _doctor(_workdir(tmp_path), path_prefix=fake)
    text = out.stdout
    base, cuda = torch.__version__.split("+")[0], torch.version.cuda
    # a CPU build or a CUDA 13 build cannot use a 535 driver; a CUDA 12 build can (floor 525)
    mismatch = cuda is None or int(cuda.split(".")[0]) >= 13
    assert _status(text, "torch CUDA build") == ("FAIL" if mismatch else "ok"), text
    if mismatch:
        assert "driver 535.104.05 is too old" in _rows(text)["torch CUDA build"]["found"]
        assert f"torch=={base}+cu126" in _fix(text, "torch CUDA build")
        assert "--index-url https://download.pytorch.org/whl/cu126" in _fix(text, "torch CUDA build")
    if not torch.cuda.is_available():
        gpus = _rows(text)["GPUs"]
        assert gpus["status"] == "FAIL" and "nvidia-smi lists 1 (NVIDIA A100-SXM4-80GB (80.0 GiB)), torch sees none" \
            in gpus["found"]
    assert out.returncode == (1 if mismatch or not torch.cuda.is_available() else 0)
