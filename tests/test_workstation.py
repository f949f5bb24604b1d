"""One machine with GPUs: `--profile workstation` and the GPU slot allocator (dico.gpu_slots).

(a) The allocator, with real processes and file locks: distinct slots; slots of a job killed with
    SIGKILL are free again; a job waits while all slots are busy and gets the one freed.
(b) The profile: the GPU count it detects (fake GPUs, CUDA_VISIBLE_DEVICES, a fake `nvidia-smi`),
    rendered by the parser snakemake uses; `snakemake -n --profile workstation` plans the paper with
    every GPU rule's jobs asking for their GPUs under `dico gpu-run`, capped at the machine's.
(c) A real DAG (tests/slurm/config.yaml, cut) on a user's own data (a folder of images and a CSV,
    data.source folder) under the profile with 3 fake GPU slots: the folder is split and trained on,
    captioned, scored and tabled; every GPU job recorded its slots and times in its log (and the
    metrics their provenance); no two jobs that ran at the same time held the same slot. Prints the
    timeline. The suite's one end-to-end run of both features (they share it to save a DAG's time).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from dico import gpu_slots
from dico.data import load_split
from own_data import export_demo_as_folder
from worlds import copy_workflow, dry_run_jobs

ROOT = Path(__file__).resolve().parents[1]
PAPER_GPUS = {"cache_features": 1, "cache_embeddings": 1, "train_xe": 2, "train_scst": 2, "train_dico": 2,
              "generate": 1, "evaluate": 1}
TWINS = {"cache_embeddings_splits": "cache_embeddings", "generate_runs": "generate", "evaluate_runs": "evaluate"}


def _env(tmp_path, **extra):
    """This venv's bin first (dico, torchrun), offline, no profile from the environment, own lock folder."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "HF_HUB_OFFLINE": "1", gpu_slots.DIR_ENV: str(tmp_path / "slots")}
    for key in ("SNAKEMAKE_PROFILE", "CUDA_VISIBLE_DEVICES", gpu_slots.FAKE_ENV):
        env.pop(key, None)
    env.update(extra)
    return env


@pytest.fixture
def fake3(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_slots.FAKE_ENV, "3")
    monkeypatch.setenv(gpu_slots.DIR_ENV, str(tmp_path / "slots"))
    return _env(tmp_path, **{gpu_slots.FAKE_ENV: "3"})


def _gpu_run(env, n, *cmd, **kw):
    """`dico gpu-run --gpus n -- cmd` in its own session (killpg reaches the wrapper and its command)."""
    return subprocess.Popen([sys.executable, "-m", "dico", "gpu-run", "--gpus", str(n), "--", *cmd], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _wait_acquired(proc) -> dict:
    for line in proc.stderr:
        if line.startswith(f"{gpu_slots.LOG_PREFIX} acquired "):
            return json.loads(line.split(" acquired ", 1)[1])
    raise AssertionError(f"no acquired line; exit {proc.wait()}")


def _free(n) -> bool:
    try:
        gpu_slots.acquire(n, timeout_s=0).release()
        return True
    except TimeoutError:
        return False


def _freed(n, seconds=10.0) -> bool:
    """n slots free within `seconds`: a killed grandchild (the job's command) is reaped by init, not by
    the test, so its last descriptor closes a moment after the wrapper's exit is seen."""
    deadline = time.monotonic() + seconds
    while not _free(n):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- (a) the allocator -------------------------------------------------------------------------------
def test_slots_are_distinct_and_never_more_than_the_machine_has(fake3):
    held = [gpu_slots.acquire(1, timeout_s=0) for _ in range(3)]
    assert sorted(h.slots[0] for h in held) == [0, 1, 2] and sorted(h.devices[0] for h in held) == ["0", "1", "2"]
    with pytest.raises(TimeoutError, match="no 1 free GPU slot"):
        gpu_slots.acquire(1, timeout_s=0)
    held[1].release()
    again = gpu_slots.acquire(1, timeout_s=0)
    assert again.slots == [1]
    with pytest.raises(ValueError, match=r"asks for 4 GPU slot\(s\) but this machine has 3 \(from DICO_FAKE_GPUS\)"):
        gpu_slots.acquire(4)


def test_a_job_killed_with_sigkill_frees_its_slots(fake3):
    """Real processes, real SIGKILL: of the whole job (wrapper + command), of the command alone (the
    wrapper logs the release, exit 137), and of the wrapper alone (the command still holds the cards
    until it ends: a card is never handed out while a job's process runs on it)."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    job = _gpu_run(fake3, 2, *sleeper)
    got = _wait_acquired(job)
    assert len(got["slots"]) == 2 and not _free(2) and _free(1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert _freed(3), "the slots of a job killed with SIGKILL are still taken"

    job = _gpu_run(fake3, 3, *sleeper)
    _wait_acquired(job)
    child = int(subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()[0])
    os.kill(child, signal.SIGKILL)
    assert job.wait(timeout=30) == 137
    assert json.loads(job.stderr.read().split(" released ", 1)[1])["exit"] == 137 and _free(3)

    job = _gpu_run(fake3, 3, *sleeper)
    _wait_acquired(job)
    child = int(subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()[0])
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert not _free(1), "the wrapper died but its command still runs on the cards"
    os.kill(child, signal.SIGKILL)
    assert _freed(3), "slots still taken after the command was killed"


def test_a_job_waits_while_every_slot_is_busy_and_gets_the_freed_one(fake3):
    held = [gpu_slots.acquire(1, timeout_s=0) for _ in range(3)]
    job = _gpu_run(fake3, 1, sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
    assert "waiting for 1 free GPU slot(s) of 3" in job.stderr.readline()
    time.sleep(1.0)
    assert job.poll() is None, "started although every slot was busy"
    freed = held[1]
    freed.release()
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0 and out.strip() == freed.devices[0] == "1", (out, err)
    assert '"slots": [1]' in err


def test_devices_come_from_cuda_visible_devices_and_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.delenv(gpu_slots.FAKE_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-8f1c")
    assert gpu_slots.devices() == ["2", "GPU-8f1c"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    _fake_nvidia_smi(tmp_path, monkeypatch, 4)
    assert gpu_slots.devices() == ["0", "1", "2", "3"]


def _fake_nvidia_smi(tmp_path, monkeypatch, n):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})'\n" for i in range(n))
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 1\n{lines}")
    (bindir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + os.environ["PATH"])


# -- (b) the profile ---------------------------------------------------------------------------------
def test_the_profile_sets_the_gpu_limit_to_the_cards_found(tmp_path, monkeypatch):
    from snakemake.profiles import ProfileConfigFileParser

    def gpus():
        with open(ROOT / "workstation" / "profile.yaml") as f:
            profile = ProfileConfigFileParser().parse(f)
        assert "configfile" not in profile and "executor" not in profile  # any config, local jobs
        return profile["resources"]

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(gpu_slots.FAKE_ENV, raising=False)
    _fake_nvidia_smi(tmp_path, monkeypatch, 4)
    assert gpus() == ["gpu=4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert gpus() == ["gpu=2"]
    monkeypatch.setenv(gpu_slots.FAKE_ENV, "3")
    assert gpus() == ["gpu=3"]


def _copy_workflow(dst: Path) -> Path:
    return copy_workflow(dst, "workstation")


def _planned(text: str) -> list[dict]:
    """Per job of a dry run (-p): rule, resource gpu (None without) and command."""
    return [{**job, "gpu": int(job["resources"]["gpu"]) if "gpu" in job["resources"] else None}
            for job in dry_run_jobs(text)]


@pytest.mark.parametrize("machine", [3, 1])
def test_the_paper_plan_puts_every_gpu_job_on_its_own_slots(tmp_path, machine):
    """`snakemake -n --profile workstation --configfile config/paper.yaml` on a 3- and a 1-GPU machine:
    every job of a GPU rule asks for min(its gpus, N) GPUs and runs under `dico gpu-run` with that
    count; a training job with 2 runs as 2 torchrun processes, capped to 1 as one plain process."""
    root = _copy_workflow(tmp_path / "repo")
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--profile", "workstation",
                          "--configfile", "config/paper.yaml"], cwd=root, capture_output=True, text=True,
                         timeout=300, env=_env(tmp_path, **{gpu_slots.FAKE_ENV: str(machine)}))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    jobs, seen = _planned(out.stdout + out.stderr), set()
    for job in jobs:
        rule = TWINS.get(job["rule"], job["rule"])
        if rule not in PAPER_GPUS:
            assert job["gpu"] is None and "gpu-run" not in job["shell"], job  # CPU jobs stay off the GPUs
            continue
        seen.add(rule)
        n = min(PAPER_GPUS[rule], machine)
        assert job["gpu"] == n, job
        command = job["shell"].removeprefix("exec ")
        assert command.startswith(f"dico gpu-run --gpus {n} -- "), job
        launched = command.removeprefix(f"dico gpu-run --gpus {n} -- ")
        assert launched.startswith(f"torchrun --standalone --nproc_per_node={n} -m dico " if n > 1 else "dico "), job
    assert seen == set(PAPER_GPUS), seen
    assert sum(j["rule"] == "train_dico" for j in jobs) > 1


# -- (c) a real DAG on fake GPU slots, on your own data ----------------------------------------------
def dag_config() -> dict:
    """tests/slurm/config.yaml, cut to the fewest jobs that still cross every GPU rule: no extra
    evaluation set, one feature job per split, grouped captioning and scoring; GPUs cut to 1 per job
    but DiCO's 2 (2 slots, 2 torchrun processes on the CPU). Its data are a user's own (data.source
    folder): the demo's 84 images and captions re-expressed as a folder and a CSV (tests/own_data.py),
    split by the folder rule into 60 / 12 / 12 as the demo's own split."""
    config = yaml.safe_load((ROOT / "tests" / "slurm" / "config.yaml").read_text())
    config["data"] = {"source": "folder", "folder": {"images": "mydata/images", "captions": "mydata/captions.csv",
                                                     "name": "My data", "val": 12, "test": 12}}
    config["features"]["jobs"] = 1
    config["evaluate"].update(datasets={}, group_runs=True)
    config["gpus"] = {"train_xe": 1, "train_scst": 1, "train_dico": 2}
    return config


def _timeline(root: Path) -> list[dict]:
    """Every `dico gpu-run` record of the job logs: job (log file), slots, start, end, exit."""
    rows = []
    for log in sorted((root / "results" / "logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        acquired = [json.loads(x) for x in re.findall(r"gpu-run: acquired (\{.*\})$", text, re.M)]
        released = [json.loads(x) for x in re.findall(r"gpu-run: released (\{.*\})$", text, re.M)]
        assert len(acquired) == len(released) <= 1, (log, acquired, released)
        for rec in released:
            assert rec["slots"] == acquired[0]["slots"] and rec["start"] == acquired[0]["start"]
            rows.append({"job": str(log.relative_to(root / "results" / "logs")), **rec,
                         "t0": datetime.fromisoformat(rec["start"]), "t1": datetime.fromisoformat(rec["end"])})
    return sorted(rows, key=lambda r: r["t0"])


@pytest.mark.slow
def test_own_data_on_three_fake_gpu_slots_runs_the_dag_and_never_shares_a_slot(tmp_path):
    root = _copy_workflow(tmp_path / "repo")
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(dag_config()))  # the whole config
    export_demo_as_folder(root / "mydata", n_images=84, image_size=32)  # 60 + 12 + 12, as tests/slurm's demo
    log = root / "snakemake.log"
    start = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "3", "--profile", "workstation",
                             "table_main"], cwd=root, stdout=f, stderr=subprocess.STDOUT, timeout=1200,
                            env=_env(tmp_path, OMP_NUM_THREADS="1", **{gpu_slots.FAKE_ENV: "3"})).returncode
    wall = time.monotonic() - start
    text = log.read_text()
    assert rc == 0, f"snakemake exited {rc} after {wall:.0f} s:\n{text[-6000:]}"
    print(f"\nDAG on 3 fake GPU slots: {wall:.0f} s wall")
    check_dag(root, text)
    splits = root / "results" / "data" / "splits.json"
    assert {s: len(load_split(splits, s)) for s in ("train", "val", "test")} == {"train": 60, "val": 12, "test": 12}
    assert "My data" in (root / "results" / "tables" / "main.tex").read_text()


def check_dag(root: Path, text: str) -> None:
    """The assertions on a finished DAG run in `root` (`text`: snakemake's output)."""
    rows = _timeline(root)
    print("timeline (job, slots, start, end):")
    for r in rows:
        print(f"  {r['job']:<40} {','.join(map(str, r['slots'])):<6} {r['start'][11:23]}  {r['end'][11:23]}")
    gpu_jobs = re.findall(r"^(?:local)?rule (train_clip|cache_features|cache_embeddings\w*|train_xe|train_scst|train_dico|"
                          r"generate\w*|evaluate\w*):", text, re.M)
    assert len(rows) == len(gpu_jobs) >= 9, (len(rows), gpu_jobs)  # every GPU job ran under gpu-run
    assert all(r["exit"] == 0 and 1 <= len(r["slots"]) <= 3 for r in rows), rows
    assert [len(r["slots"]) for r in rows if r["job"] == "train/dico.log"] == [2]
    overlapping = 0
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["t0"] < b["t1"] and b["t0"] < a["t1"]:
                overlapping += 1
                assert not set(a["slots"]) & set(b["slots"]), f"{a['job']} and {b['job']} ran at once on {a} {b}"
    assert overlapping >= 1, "no two GPU jobs ran at once: the check above proved nothing"

    # the 2-slot DiCO job ran as 2 processes; the metrics carry the slots of the job that scored them
    assert "exec dico gpu-run --gpus 2 -- torchrun --standalone --nproc_per_node=2 -m dico train dico " in text
    assert "2 process(es)" in (root / "results" / "logs" / "train" / "dico.log").read_text()
    scoring = next(r for r in rows if r["job"].startswith("evaluate/"))
    for run in ("xe", "scst_cider", "dico"):
        prov = json.loads((root / "results" / "metrics" / run / "test.json").read_text())["provenance"]
        assert prov["gpu_slots"]["slots"] == scoring["slots"] and prov["gpu_slots"]["start"] == scoring["start"]
