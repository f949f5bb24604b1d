"""The `dico` CLI end to end on a tiny config, and torchrun with 2 CPU processes (gloo) computing the
same training run as 1 process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from dico import config as C
from worlds import TINY_CONFIG

# The shared tiny config (tests/worlds.py) with 40 / 8 / 8 images and, for the rest, the schema's defaults.
TINY = C.deep_merge(TINY_CONFIG, {
    "device": "auto", "data": {"demo": {"n_train": 40, "n_val": 8, "n_test": 8}},
    "features": {"shard_size": 16, "batch_size": 256}, "model": {"max_caption_tokens": 77},
    "decoding": {"max_len": 16, "beam_size": 5}, "train": {"log_every": 1},
    "xe": {"batch_size": 20, "grad_accum": 2, "val_every": 20, "lr": 3e-3},
    "scst": {"rewards": ["cider", "clip_s", "pac_s"]},
    "ablations": {"beta": [0.05, 0.1, 0.2, 0.5, 1.0], "k": [2, 3, 5], "reward": ["pac_s", "clip_s"],
                  "tau": [1, 30, 100, 300, 1000]},
    "evaluate": {"meteor": True, "splits": ["val", "test"]}, "report": {"reported": "config/paper_reported.yaml"}})


def dico(*args, cwd, env=None):
    out = subprocess.run([sys.executable, "-m", "dico", *args], cwd=cwd, capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "config.yaml").write_text(yaml.safe_dump(TINY))
    cfg = ["--config", str(root / "config.yaml")]
    dico("make-demo-data", *cfg, "--out-dir", "demo", cwd=root)
    dico("prepare-splits", "--karpathy-json", "demo/dataset_demo.json", "--image-root", "demo/images",
         "--out", "splits.json", cwd=root)
    dico("train-clip", *cfg, "--name", "clip", "--splits", "splits.json", "--out", "clip.pt", "--threads", "1", cwd=root)
    for split in ("train", "val"):
        dico("cache-features", *cfg, "--splits", "splits.json", "--split", split, "--checkpoint", "clip.pt",
             "--out-dir", f"features/{split}", cwd=root)
    return root


def _train(root, name, launcher, run="xe", config="config.yaml", extra=()):
    args = ["train", run, "--config", config, "--splits", "splits.json",
            "--features-train", "features/train/index.json", "--features-val", "features/val/index.json",
            "--out-model", f"{name}/model.pt", "--out-log", f"{name}/log.jsonl", "--threads", "1", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*launcher, *args], cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return torch.load(root / name / "model.pt", weights_only=False), out.stderr


def _rows(root, name):
    return [json.loads(x) for x in (root / name / "log.jsonl").read_text().splitlines()]


def test_cli_steps_write_their_outputs(prepared):
    index = json.loads((prepared / "features" / "train" / "index.json").read_text())
    assert index["n_images"] == 40 and index["dtype"] == "float16" and len(index["shards"]) == 3
    assert (prepared / "clip.pt").exists() and (prepared / "demo" / "dataset_demo.json").exists()


def test_bad_config_exits_with_the_key(prepared, tmp_path):
    bad = dict(TINY, xe={**TINY["xe"], "lr": -1})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "dico", "train", "xe", "--config", str(tmp_path / "bad.yaml"),
                          "--splits", "s", "--features-train", "a", "--features-val", "b", "--out-model", "m",
                          "--out-log", "l"], cwd=prepared, capture_output=True, text=True)
    assert out.returncode == 2
    assert "xe.lr: -1 is less than or equal to the minimum of 0" in out.stderr


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
ONE = [sys.executable, "-m", "dico"]
TWO = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "dico"]


def _first_step_gradients(root, name) -> dict:
    """The gradient of the first optimiser step, read back from Adam's first moment in last.pt:
    after one step exp_avg = (1 - beta1) * g exactly (and the XE warm-up runs that step at lr 0)."""
    state = torch.load(root / name / "work" / "last.pt", weights_only=False)
    names = list(state["model"])
    opt = state["optimizer"]
    assert all(s["step"] == 1 for s in opt["state"].values())
    return {names[i]: s["exp_avg"] / 0.1 for i, s in opt["state"].items()}


def _assert_equal_gradients(a: dict, b: dict):
    """Equal up to float summation order (each rank sums its share, then the ranks are summed)."""
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in a.values())
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6 * scale), (k, (a[k] - b[k]).abs().max())


@needs_torchrun
def test_two_processes_compute_the_gradient_of_one_process(prepared, tmp_path):
    """XE: one step with the global batch split over 2 ranks equals one process (gradients summed over
    ranks, losses normalised by the global token count)."""
    cfg = dict(TINY, xe={**TINY["xe"], "steps": 1, "val_every": 1})
    (prepared / "one_step.yaml").write_text(yaml.safe_dump(cfg))
    _train(prepared, "grad1", ONE, config="one_step.yaml")
    _train(prepared, "grad2", TWO, config="one_step.yaml")
    g1, g2 = _first_step_gradients(prepared, "grad1"), _first_step_gradients(prepared, "grad2")
    assert max(g.abs().max().item() for g in g1.values()) > 0
    _assert_equal_gradients(g1, g2)
    # the logged loss is the global one, not rank 0's share
    l1, l2 = (_rows(prepared, n)[0] for n in ("grad1", "grad2"))
    assert l1["phase"] == l2["phase"] == "train" and l1["loss"] == pytest.approx(l2["loss"], rel=1e-6)


@needs_torchrun
def test_torchrun_two_processes_equal_one_process(prepared):
    """Several steps: Adam turns last-bit gradient differences into visible weight differences, so
    weights are compared with a tolerance derived from the step count (an Adam update moves a weight
    by at most ~lr * (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr per step, so two runs drift apart by at most
    twice that per step), the loss curves and the validation closely, on a model that learns."""
    one, _ = _train(prepared, "one", ONE)
    two, log = _train(prepared, "two", TWO)
    assert "2 process(es)" in log
    steps, lr = TINY["xe"]["steps"], TINY["xe"]["lr"]
    tol = 2 * 3.2 * lr * steps
    for k, v in one["state_dict"].items():
        assert (v - two["state_dict"][k]).abs().max() <= tol, k
    assert one["step"] == two["step"]
    assert one["val"]["CIDEr"] > 0.05  # the model learns something (an untrained one scores ~0)
    assert abs(one["val"]["CIDEr"] - two["val"]["CIDEr"]) < 0.05
    loss1 = [r["loss"] for r in _rows(prepared, "one") if r["phase"] == "train"]
    loss2 = [r["loss"] for r in _rows(prepared, "two") if r["phase"] == "train"]
    assert len(loss1) == len(loss2) == steps and loss1[0] == pytest.approx(loss2[0], rel=1e-6)
    assert all(abs(a - b) <= 0.02 * a for a, b in zip(loss1, loss2)), (loss1, loss2)
    rows = _rows(prepared, "two")
    assert sum(r["phase"] == "val" for r in rows) == steps // TINY["xe"]["val_every"]  # one log, by rank 0
    assert len(list((prepared / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1  # and one curve file


@needs_torchrun
def test_two_processes_compute_the_dico_gradient_of_one_process(prepared):
    """DiCO, the paper's 2-GPU job: beams, rewards, log-probs and the loss split over 2 ranks give the
    gradient of one process on the whole batch (dropout 0 here, so both are deterministic)."""
    for split in ("train", "val"):
        if not (prepared / f"emb_{split}.pt").exists():
            dico("cache-embeddings", "--config", "config.yaml", "--name", "clip", "--splits", "splits.json",
                 "--split", split, "--checkpoint", "clip.pt", "--out", f"emb_{split}.pt", cwd=prepared)
    xe = prepared / "one" / "model.pt"
    if not xe.exists():
        _train(prepared, "one", ONE)
    cfg = dict(TINY, dico={"steps": 1, "val_every": 1, "batch_images": 4, "k": 3, "lr": 1e-6})
    (prepared / "dico.yaml").write_text(yaml.safe_dump(cfg))
    extra = ["--init", str(xe), "--clip-model", "clip=clip.pt", "--embeddings", "clip:train=emb_train.pt",
             "--embeddings", "clip:val=emb_val.pt"]
    _train(prepared, "dico1", ONE, run="dico", config="dico.yaml", extra=extra)
    _train(prepared, "dico2", TWO, run="dico", config="dico.yaml", extra=extra)
    _assert_equal_gradients(_first_step_gradients(prepared, "dico1"), _first_step_gradients(prepared, "dico2"))
    t1, t2 = ([r for r in _rows(prepared, n) if r["phase"] == "train"][0] for n in ("dico1", "dico2"))
    for key in ("loss", "reward_mean", "mean_len"):
        assert t1[key] == pytest.approx(t2[key], rel=1e-5), key


@needs_torchrun
def test_two_processes_fine_tune_in_passes_with_dropout(prepared):
    """dico.grad_accum under torchrun with dropout on (the official setting: candidates from the policy
    in train mode, dropout 0.1): 2 processes x 2 passes of 1 image for two steps run to the end with one
    optimiser step per global batch. That passes give one pass's gradient is test_grad_accum.py."""
    for split in ("train", "val"):
        if not (prepared / f"emb_{split}.pt").exists():
            dico("cache-embeddings", "--config", "config.yaml", "--name", "clip", "--splits", "splits.json",
                 "--split", split, "--checkpoint", "clip.pt", "--out", f"emb_{split}.pt", cwd=prepared)
    if not (prepared / "one" / "model.pt").exists():
        _train(prepared, "one", ONE)
    xe = torch.load(prepared / "one" / "model.pt", weights_only=False)
    xe["model_config"]["dropout"] = 0.1  # the same weights, fine-tuned with dropout (TINY trains XE without)
    torch.save(xe, prepared / "xe_dropout.pt")
    cfg = dict(TINY, dico={"steps": 2, "val_every": 2, "batch_images": 4, "grad_accum": 2, "k": 3, "lr": 1e-6})
    (prepared / "dico_accum.yaml").write_text(yaml.safe_dump(cfg))
    extra = ["--init", "xe_dropout.pt", "--clip-model", "clip=clip.pt", "--embeddings", "clip:train=emb_train.pt",
             "--embeddings", "clip:val=emb_val.pt"]
    model, log = _train(prepared, "dico_accum", TWO, run="dico", config="dico_accum.yaml", extra=extra)
    assert "2 process(es)" in log and "2 pass(es) of 1 per process" in log
    assert model["model_config"]["dropout"] == 0.1 and model["spec"]["dico"]["generation_mode"] == "train"
    state = torch.load(prepared / "dico_accum" / "work" / "last.pt", weights_only=False)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # one step per global batch
    train = [r for r in _rows(prepared, "dico_accum") if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["skipped"] == 0 for r in train)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reward_mean"], r["grad_norm"]])).all() for r in train)
