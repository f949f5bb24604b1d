"""The `dico` CLI end to end on a tiny config, and torchrun with 2 CPU processes (gloo) computing the
same training run as 1 process with the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

TINY = {
    "data": {"source": "demo", "demo": {"n_train": 40, "n_val": 8, "n_test": 8, "image_size": 32}},
    "clip_models": {"clip": {"source": "demo", "train": {"steps": 5, "batch_size": 16, "patch_size": 8,
                                                         "vision_layers": 1, "text_layers": 1}}},
    "features": {"backbone": "clip", "num_workers": 0, "shard_size": 16},
    "model": {"d_model": 32, "enc_layers": 1, "dec_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
              "vocab": "train", "max_dec_positions": 40},
    "decoding": {"max_len": 16},
    "xe": {"steps": 12, "batch_size": 20, "grad_accum": 2, "captions_per_image": None, "val_every": 6, "lr": 2e-3},
    "evaluate": {"clip_s": {"model": "clip"}, "pac_s": {"model": "clip"}},
    "rewards": {"cider": {"type": "cider"}, "clip_s": {"type": "clip", "model": "clip"},
                "pac_s": {"type": "clip", "model": "clip"}},
}


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


def _train(root, name, launcher):
    args = ["train", "xe", "--config", "config.yaml", "--splits", "splits.json",
            "--features-train", "features/train/index.json", "--features-val", "features/val/index.json",
            "--out-model", f"{name}/model.pt", "--out-log", f"{name}/log.jsonl", "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*launcher, *args], cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return torch.load(root / name / "model.pt", weights_only=False), out.stderr


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


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_torchrun_two_processes_equal_one_process(prepared):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    one, _ = _train(prepared, "one", [sys.executable, "-m", "dico"])
    two, log = _train(prepared, "two", [torchrun, "--standalone", "--nproc_per_node=2", "-m", "dico"])
    assert "2 process(es)" in log
    for k, v in one["state_dict"].items():
        assert torch.allclose(v, two["state_dict"][k], atol=2e-5, rtol=1e-4), k
    assert one["step"] == two["step"]
    assert abs(one["val"]["CIDEr"] - two["val"]["CIDEr"]) < 1e-6
    rows = [json.loads(x) for x in (prepared / "two" / "log.jsonl").read_text().splitlines()]
    assert sum(r["phase"] == "val" for r in rows) == 2  # one log, written by rank 0 only
