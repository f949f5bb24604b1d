"""What the tests share: one tiny world factory (demo images, a split file, a random tiny CLIP, and on
request its cached features, image embeddings, a config file and XE captioners), one tiny config and
one runner of the `dico` command line, and a copy of the workflow as a user's checkout holds it."""
import copy
import logging
import re
import shutil
from pathlib import Path

import yaml

from dico import config as C
from dico.clip_weights import load_evaluator, save_evaluator
from dico.data import load_split, normalise_karpathy
from dico.demo import make_demo_data
from dico.demo.clip import build_tiny_clip, tiny_clip_config

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ("Snakefile", "workflow", "config", "envs")


def copy_workflow(dst, *extra: str) -> Path:
    """The repository's workflow (Snakefile, rules, configs, envs, and `extra` such as a profile folder)
    copied into `dst`, where the end-to-end tests run the real snakemake on it."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*WORKFLOW, *extra):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def tiny_world(root, *, n_train: int, n_val: int, n_test: int, seed: int, image_size: int = 32):
    """Writes root/demo (JPEGs + Karpathy file), root/splits.json and root/clip.pt (a random
    32-px CLIP: patch 8, one 64-wide layer per tower); returns the loaded evaluator."""
    karpathy = make_demo_data(root / "demo", n_train=n_train, n_val=n_val, n_test=n_test,
                              image_size=image_size, seed=seed)
    normalise_karpathy(karpathy, root / "demo" / "images", root / "splits.json")
    cfg = tiny_clip_config(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                           text_width=64, text_layers=1, context_length=32)
    save_evaluator(build_tiny_clip(cfg, seed=0), root / "clip.pt")
    return load_evaluator(root / "clip.pt")


def make_world(root, *, n_train: int, n_val: int, n_test: int, seed: int, features=(), embeddings=(),
               shard_size: int = 8, batch_size: int = 8, config: dict | None = None, xe_runs=(),
               xe_config: dict | None = None) -> dict:
    """`tiny_world` in `root`, then: grid features of the splits in `features` (root/features/<split>),
    image embeddings of those in `embeddings`, `config` written to root/config.yaml, and an XE
    captioner per run of `xe_runs` trained with it (or with `xe_config`: root/<run>/model.pt, log.jsonl,
    work/).
    Returns {"root", "splits", "ev", "features": {split: index.json}, "embs": {split: tensor}}."""
    from dico.embeddings import embed_images
    from dico.features import cache_features

    ev = tiny_world(root, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    world = {"root": root, "splits": root / "splits.json", "ev": ev, "features": {}, "embs": {}}
    for split in features:
        records = load_split(world["splits"], split)
        index = cache_features(ev, "clip", root / "clip.pt", records, split, root / "features" / split,
                               shard_size=shard_size, batch_size=batch_size, log=lambda *a: None)
        assert index["n_images"] == len(records)
        world["features"][split] = str(root / "features" / split / "index.json")
    for split in embeddings:
        world["embs"][split] = embed_images(ev, [r.path for r in load_split(world["splits"], split)], progress=False)
    if config is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    for run in xe_runs:
        from dico.train import train_xe

        train_xe(C.run_spec(C.validate(copy.deepcopy(xe_config or config)), run), world["splits"], world["features"],
                 root / run / "work", root / run / "model.pt", root / run / "log.jsonl", device="cpu",
                 log=lambda *a: None)
    return world


def run_dico(caplog, *argv, capsys=None) -> tuple[int, str | None, str]:
    """`dico ARGV` in this process, through its real error boundary: (exit code, what it printed on
    stdout (with `capsys`), what it logged)."""
    from dico import cli

    caplog.clear()
    if capsys is not None:
        capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="dico"):
        code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().out if capsys is not None else None, caplog.text


def sigterm_at_step(monkeypatch, step: int) -> None:
    """Make the training loop see SIGTERM after `step` steps (its stop flag is read once per step), as
    SLURM's preemption would; monkeypatch.undo() or the test's end restores the real flag."""
    from dico import runtime

    calls = {"n": 0}

    class FlagAfter(runtime.StopFlag):
        @property
        def requested(self):
            calls["n"] += 1
            return calls["n"] == step

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(runtime, "StopFlag", FlagAfter)


# A whole config for the tiny worlds' CLI tests (24 / 6 / 6 demo images, a 1 + 1-layer captioner).
TINY_CONFIG = {
    "seed": 0, "device": "cpu",
    "data": {"source": "demo", "demo": {"n_train": 24, "n_val": 6, "n_test": 6, "image_size": 32}},
    "clip_models": {"clip": {"source": "demo", "train": {"steps": 5, "batch_size": 16, "patch_size": 8,
                                                         "vision_layers": 1, "text_layers": 1}}},
    "features": {"backbone": "clip", "num_workers": 0, "shard_size": 8, "batch_size": 8},
    "model": {"d_model": 32, "enc_layers": 1, "dec_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
              "vocab": "train", "max_caption_tokens": 24, "max_dec_positions": 40},
    "decoding": {"max_len": 12, "beam_size": 2},
    "train": {"log_every": 50},
    "xe": {"steps": 40, "batch_size": 24, "grad_accum": 1, "captions_per_image": None, "val_every": 40,
           "lr": 5.0e-3},
    "scst": {"rewards": ["cider"]}, "dico": {}, "ablations": {},
    "rewards": {"cider": {"type": "cider"}, "clip_s": {"type": "clip", "model": "clip"},
                "pac_s": {"type": "clip", "model": "clip"}},
    "evaluate": {"splits": ["test"], "meteor": False, "clip_s": {"model": "clip"}, "pac_s": {"model": "clip"}},
    "report": {"reported": None},
}


def dry_run_jobs(text: str) -> list[dict]:
    """Per planned job of `snakemake -n -p` output: rule, resources (name -> value) and the shell command."""
    jobs = []
    for block in re.split(r"\n(?=\[[A-Z][a-z]{2} [A-Z][a-z]{2} )", text):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not rule:
            continue
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        resources = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append({"rule": rule.group(1), "resources": resources, "shell": shell.group(1) if shell else ""})
    return jobs
