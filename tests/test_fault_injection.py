"""Kills and resumes, for real (docs/architecture.md, "Contracts").

- SIGTERM (SLURM preemption / time limit) to a running `dico train`: checkpoint, exit 143, and the
  rerun resumes to the model an uninterrupted run ends with.
- `kill -9` during feature caching: the rerun keeps the complete shards ("resumed: N of M images were
  already cached") and recomputes the rest; a truncated shard or a stale temporary is never trusted.
- `kill -9` of the whole Snakemake DAG in the middle of XE and of DiCO, then `snakemake --unlock` and
  `snakemake --rerun-incomplete`: the training job resumes from its last checkpoint ("resumed from
  step N") and the final test metrics equal those of an uninterrupted run (which, for the XE case, is
  the training, captioning and scoring run a second time: the determinism check).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dico import config as C
from dico.clip_weights import load_evaluator
from dico.data import load_split
from dico.features import FeatureStore, cache_features
from worlds import TINY_CONFIG, copy_workflow, make_world

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

# Small enough for 2 CPU cores, big enough that a kill lands mid-run: XE checkpoints at steps 10, 20,
# 30, 40 and DiCO at 4, 8, 12, 16; dropout > 0 so that resuming must restore the RNG states too.
TINY = C.deep_merge(TINY_CONFIG, {
    "deterministic": True, "data": {"demo": {"n_train": 40, "n_val": 8, "n_test": 8}},
    "features": {"shard_size": 16, "batch_size": 16}, "model": {"dropout": 0.1}, "decoding": {"max_len": 16},
    "train": {"log_every": 5}, "xe": {"batch_size": 20, "val_every": 10, "lr": 2.0e-3}, "scst": {"rewards": []},
    "dico": {"steps": 16, "batch_images": 4, "k": 2, "val_every": 4, "lr": 1.0e-4}})
TARGETS = ["results/metrics/xe/test.json", "results/metrics/dico/test.json"]


# -- library-level fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40/8/8 demo images, a random tiny CLIP backbone, cached train/val features, a config file."""
    return make_world(tmp_path_factory.mktemp("faults"), n_train=40, n_val=8, n_test=8, seed=1,
                      features=("train", "val"), shard_size=16, batch_size=16, config=TINY)["root"]


def _train_cmd(root, out: str):
    return [sys.executable, "-m", "dico", "train", "xe", "--config", str(root / "config.yaml"),
            "--splits", str(root / "splits.json"), "--features-train", str(root / "features/train/index.json"),
            "--features-val", str(root / "features/val/index.json"), "--out-model", str(root / out / "model.pt"),
            "--out-log", str(root / out / "train_log.jsonl"), "--threads", "1"]


def _wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{what} ended (rc {proc.returncode}) before {path} appeared")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_equals_an_uninterrupted_run(world):
    straight = subprocess.run(_train_cmd(world, "straight"), cwd=world, env=ENV, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    proc = subprocess.Popen(_train_cmd(world, "preempted"), cwd=world, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(world / "preempted" / "work" / "last.pt", proc, "dico train")
    proc.send_signal(signal.SIGTERM)   # what SLURM sends at preemption and at the time limit
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert not (world / "preempted" / "model.pt").exists()  # no output until the run is complete
    stopped_at = torch.load(world / "preempted" / "work" / "last.pt", weights_only=False)["step"]
    assert 10 <= stopped_at < 40

    resumed = subprocess.run(_train_cmd(world, "preempted"), cwd=world, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stderr
    print(f"SIGTERM: exit 143 with a checkpoint at step {stopped_at} of 40; the rerun resumed from it")
    a = torch.load(world / "straight" / "model.pt", weights_only=False)
    b = torch.load(world / "preempted" / "model.pt", weights_only=False)
    assert a["step"] == b["step"] and a["val"] == b["val"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (world / "straight" / "train_log.jsonl").read_text().count('"phase": "val"') == \
        (world / "preempted" / "train_log.jsonl").read_text().count('"phase": "val"')


def test_preemption_is_logged_not_silent(caplog, monkeypatch):
    """Preempted is a SystemExit with an int code, which Python exits with silently: main() must log it."""
    import logging

    from dico import cli, runtime
    from dico.cli import data

    def preempted(args):
        raise runtime.Preempted(17)

    monkeypatch.setattr(data, "cmd_prepare_splits", preempted)
    with caplog.at_level(logging.INFO, logger="dico"), pytest.raises(SystemExit) as stop:
        cli.main(["prepare-splits", "--karpathy-json", "k", "--image-root", "r", "--out", "o"])
    assert stop.value.code == 143
    assert "SIGTERM received: checkpoint saved at step 17; rerun to resume" in caplog.text


def test_work_dir_drops_half_written_checkpoints_of_a_killed_run(tmp_path):
    from dico import io, runtime

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "work").mkdir()
    stale = tmp_path / "work" / f".last.pt.{io._HOST}.{dead}.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    runtime.WorkDir(tmp_path / "work")
    assert not stale.exists()


# -- feature caching ------------------------------------------------------------------------------
SLOW_CACHE = textwrap.dedent("""
    import sys, time
    from dico.data import load_split
    from dico.clip_weights import load_evaluator
    from dico.features import cache_features

    root, out = sys.argv[1], sys.argv[2]
    ev = load_evaluator(f"{root}/clip.pt")
    fast = ev.grid_features
    ev.grid_features = lambda pixels: (time.sleep(0.4), fast(pixels))[1]  # 0.4 s per batch of 8
    cache_features(ev, "clip", f"{root}/clip.pt", load_split(f"{root}/splits.json", "train"), "train", out,
                   shard_size=8, batch_size=8)
""")


def _cache(world, out, log):
    ev = load_evaluator(world / "clip.pt")
    return cache_features(ev, "clip", world / "clip.pt", load_split(world / "splits.json", "train"), "train", out,
                          shard_size=8, batch_size=8, log=log)


def _all_features(index_json):
    store = FeatureStore(index_json)
    return store[np.arange(len(store))].numpy()


@pytest.fixture(scope="module")
def uninterrupted_features(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("features_straight")
    _cache(world, out, lambda *a: None)
    return _all_features(out / "index.json")


def test_kill_9_during_feature_caching_keeps_complete_shards(world, tmp_path, uninterrupted_features):
    out = tmp_path / "features"
    script = tmp_path / "slow_cache.py"
    script.write_text(SLOW_CACHE)
    proc = subprocess.Popen([sys.executable, str(script), str(world), str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for(out / "shard_00001.npy", proc, "feature caching")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists()  # nothing vouches for an incomplete split
    on_disk = {p.name for p in out.glob("shard_*.npy")}
    assert 2 <= len(on_disk) < 5
    # a shard counts once progress.json lists it; the kill may land between a shard's rename and that
    # entry, and such a shard must be recomputed, not trusted
    listed = set(json.loads((out / "progress.json").read_text())["done"])
    assert "shard_00000.npy" in listed and listed <= on_disk
    cached = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in listed}

    lines = []
    index = _cache(world, out, lines.append)
    n = 8 * len(cached)
    assert f"resumed: {n} of 40 images were already cached in complete shards" in lines
    print(f"killed feature caching with {len(on_disk)} of 5 shards on disk, {len(listed)} listed as done; "
          f"resumed: {n} of 40 images were cached")
    for name, stamp in cached.items():  # not recomputed
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    assert index["n_images"] == 40 and len(index["shards"]) == 5
    assert np.array_equal(_all_features(out / "index.json"), uninterrupted_features)
    assert not list(out.glob(".*.tmp"))


def test_truncated_shard_and_stale_temporaries_are_never_trusted(world, tmp_path, uninterrupted_features):
    out = tmp_path / "features"
    _cache(world, out, lambda *a: None)
    shard = out / "shard_00002.npy"
    with open(shard, "r+b") as f:   # e.g. a copy that was cut short, or a full disk
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"shard_00002.npy is truncated .* delete .*index.json and rerun "
                                         r"cache_features"):
        FeatureStore(out / "index.json")
    # a temporary left by a writer that was killed (its pid no longer exists) next to a real shard
    from dico import io

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = out / f".shard_00004.npy.{io._HOST}.{dead}.abc123.tmp"
    stale.write_bytes(b"half a shard")
    (out / "shard_00003.npy").write_bytes(b"")  # killed before a single byte arrived

    lines = []
    _cache(world, out, lines.append)
    assert "resumed: 24 of 40 images were already cached in complete shards" in lines  # shards 0, 1, 4
    assert not stale.exists()
    assert np.array_equal(_all_features(out / "index.json"), uninterrupted_features)


def test_skipped_images_are_still_reported_after_a_resume(world, tmp_path):
    """features.skip_broken_images: zeros + the id in the index, also for shards cached before a kill."""
    import dico.features as F

    records = load_split(world / "splits.json", "train")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    records[3] = type(records[3])(records[3].image_id, broken, records[3].captions)  # in shard 0
    ev = load_evaluator(world / "clip.pt")
    out = tmp_path / "features"
    real = F._compute

    def dies_after_two_shards(*args, **kwargs):  # _compute yields each shard once it is on disk
        shards = real(*args, **kwargs)
        for _ in range(2):
            yield next(shards)
        shards.close()  # the loader and the third shard's temporary go, as in a kill
        raise KeyboardInterrupt  # stands in for the kill

    F._compute = dies_after_two_shards
    try:
        with pytest.raises(KeyboardInterrupt):
            cache_features(ev, "clip", world / "clip.pt", records, "train", out, shard_size=8, batch_size=8,
                           skip_broken=True, log=lambda *a: None)
    finally:
        F._compute = real
    lines = []
    index = cache_features(ev, "clip", world / "clip.pt", records, "train", out, shard_size=8, batch_size=8,
                           skip_broken=True, log=lines.append)
    assert "resumed: 16 of 40 images were already cached in complete shards" in lines
    assert index["skipped_images"] == [records[3].image_id]
    assert any(line.startswith("skipped 1 of 40 images in split 'train'") for line in lines)
    feats = FeatureStore(out / "index.json")[[2, 3]]
    assert feats[1].abs().max() == 0 and feats[0].abs().max() > 0


# -- the whole DAG --------------------------------------------------------------------------------
def _workflow_copy(dst: Path) -> Path:
    """The repository's workflow in `dst` with TINY as its config (config/config.yaml is replaced, not
    merged with: --configfile merges into the demo config, whose ablations and models would stay)."""
    copy_workflow(dst)
    (dst / "config" / "config.yaml").write_text(yaml.safe_dump(TINY))
    return dst


def _snakemake(cwd, *args, check=True):
    out = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=900)
    if check:
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


def _kill_dag_when(cwd: Path, watch: str) -> None:
    """Start the DAG in its own session and SIGKILL the whole process group once `watch` exists."""
    with open(cwd / "killed_run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "snakemake", *TARGETS, "--cores", "2"], cwd=cwd, env=ENV,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(cwd / watch, proc, "snakemake", timeout=600)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _metrics(cwd, run):
    return json.loads((cwd / "results" / "metrics" / run / "test.json").read_text())


def _assert_same_metrics(a: dict, b: dict):
    for key, value in a["metrics"].items():
        if value is None:
            assert b["metrics"][key] is None, key
        else:
            assert abs(value - b["metrics"][key]) <= 1e-6, (key, value, b["metrics"][key])


def _resume_dag(cwd: Path, run: str, total: int) -> int:
    """After the kill: the job is mid-run; unlock, rerun incomplete jobs; return the resumed step."""
    results = cwd / "results"
    assert not (results / "runs" / run / "model.pt").exists(), "the training job finished before the kill"
    step = torch.load(results / "runs" / run / "work" / "last.pt", weights_only=False)["step"]
    assert 0 < step < total
    # `kill -9` leaves Snakemake's lock behind: --unlock is the documented way out
    locked = _snakemake(cwd, *TARGETS, "--cores", "2", check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    _snakemake(cwd, "--unlock")
    _snakemake(cwd, *TARGETS, "--cores", "2", "--rerun-incomplete")
    assert f"resumed from step {step}" in (results / "logs" / "train" / f"{run}.log").read_text()
    print(f"killed the DAG in {run} with last.pt at step {step} of {total}; the rerun resumed from step {step}")
    leftovers = [p for p in results.rglob("*.tmp") if "work" not in p.parts]
    assert not leftovers, leftovers
    return step


@pytest.fixture(scope="module")
def reference_dag(tmp_path_factory):
    """One uninterrupted run of the tiny DAG."""
    work = _workflow_copy(tmp_path_factory.mktemp("dag_reference"))
    _snakemake(work, *TARGETS, "--cores", "2")
    return work


def _clone(reference: Path, dst: Path, *drop: str) -> Path:
    """The reference run's directory (mtimes and .snakemake metadata kept) without `drop`."""
    shutil.copytree(reference, dst, symlinks=True)
    for path in drop:
        shutil.rmtree(dst / path)
    return dst


@pytest.mark.slow
def test_kill_9_of_the_dag_during_xe_resumes_and_matches_an_uninterrupted_run(reference_dag, tmp_path):
    """XE and everything after it again (data, CLIP, features and embeddings are the reference's: their
    determinism and resume are the feature tests' business), killed in XE."""
    work = _clone(reference_dag, tmp_path / "dag", "results/runs", "results/captions", "results/metrics")
    _kill_dag_when(work, "results/runs/xe/work/last.pt")
    _resume_dag(work, "xe", TINY["xe"]["steps"])
    for run in ("xe", "dico"):
        ref, got = _metrics(reference_dag, run), _metrics(work, run)
        _assert_same_metrics(ref, got)
        assert ref["metrics"] == got["metrics"]  # determinism: the same config and seed, the same numbers
        prov = got["provenance"]
        assert prov["seed"] == TINY["seed"] and prov["determinism"]["torch_deterministic_algorithms"] is True
        assert prov["run_provenance"]["seed"] == TINY["seed"] and prov["run_provenance"]["spec"]["deterministic"]


@pytest.mark.slow
def test_kill_9_of_the_dag_during_dico_resumes_and_matches_an_uninterrupted_run(reference_dag, tmp_path):
    work = _clone(reference_dag, tmp_path / "dag", "results/runs/dico", "results/captions/dico",
                  "results/metrics/dico")
    _kill_dag_when(work, "results/runs/dico/work/last.pt")
    _resume_dag(work, "dico", TINY["dico"]["steps"])
    _assert_same_metrics(_metrics(reference_dag, "dico"), _metrics(work, "dico"))
    a = torch.load(reference_dag / "results/runs/dico/model.pt", weights_only=False)
    b = torch.load(work / "results/runs/dico/model.pt", weights_only=False)
    assert a["step"] == b["step"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
