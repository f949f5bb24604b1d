"""The paper's DAG rehearsed at the paper's shapes on a CPU (config/paper.yaml + config/rehearsal.yaml).

The slow test serves every download of the paper config from a loopback server (tests/paper_fixtures.py:
COCO-layout zips, Karpathy's zip, random-weight OpenAI ViT-L/14 and ViT-B/32 checkpoints, the PAC-S
layout behind a Drive confirmation page), runs the real `snakemake --cores 2` through download ->
unpack -> prepare_splits -> cache_features -> train_xe -> train_scst / train_dico -> generate ->
evaluate -> tables and figures, with the training jobs under `torchrun --nproc_per_node=2` (gloo), and
checks the shapes that only the paper's path has: ViT-L/14 features 257 x 1024 fp16, CLIP's 49,409-token
vocabulary, beams [B, 5, <= 30], the captioner the official code builds. It prints the wall time of
each stage (and writes it to results/rehearsal_stages.json in its work dir).

The fast tests check what the rehearsal relies on: the overrides are counts only, and the training
rules start under torchrun with train.processes.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

import paper_fixtures as F
from dico import config as C
from dico.data import load_split
from worlds import copy_workflow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["config/paper.yaml", "config/rehearsal.yaml"]
METRIC_KEYS = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIP-S", "RefCLIP-S", "PAC-S", "RefPAC-S"]
RUNS = ["xe", "scst_cider", "scst_clip_s", "scst_pac_s", "dico"]  # paper runs; the 1-value grid adds none
SCORED = RUNS + ["dico_official"]  # + the released checkpoint, converted and scored like a run
TRAIN_RULES = ("train_xe", "train_scst", "train_dico")

# What config/rehearsal.yaml may change: counts (how many, how often, how much at once) and the
# device. Anything else - a width, a layer count, the vocabulary, beam size or length, k, a reward, a
# dtype, the backbone, a switch that picks another code path - is a shape or a path and is the paper's.
COUNT_KEYS = {
    "device",                                                    # cpu instead of cuda
    "features.batch_size", "features.num_workers", "features.shard_size",
    "train.val_images", "train.log_every", "train.processes",
    "xe.steps", "xe.batch_size", "xe.grad_accum", "xe.val_every",
    "scst.steps", "scst.batch_images", "scst.val_every",
    "dico.steps", "dico.batch_images", "dico.val_every",
    "ablations.beta", "ablations.tau", "ablations.k", "ablations.reward",  # one value each (below)
    "evaluate.datasets",                                         # no out-of-domain set (null)
}


def _leaves(d: dict, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _env():
    bindir = str(Path(sys.executable).parent)  # snakemake, dico and torchrun of this venv in the jobs
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def _snakemake(*args, cwd, timeout):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _copy_workflow(dst: Path) -> Path:
    return copy_workflow(dst)


# -- fast: the overrides and the launcher ---------------------------------------------------------
def test_rehearsal_config_changes_counts_only():
    from dico import config as C

    paper = C.load(ROOT / "config" / "paper.yaml")  # with the schema defaults, which are the paper's
    rehearsal = yaml.safe_load((ROOT / "config" / "rehearsal.yaml").read_text())
    keys = dict(_leaves(rehearsal))
    not_counts = sorted(set(keys) - COUNT_KEYS)
    assert not not_counts, f"config/rehearsal.yaml changes more than counts: {not_counts}"
    assert keys["device"] == "cpu"
    for key, value in keys.items():
        if key.startswith("ablations."):  # one value, the paper's default: no run beyond the paper's
            name = key.split(".")[1]
            assert value == [paper["dico"][name]], key
        elif key == "evaluate.datasets":  # zero extra sets: the OOD path runs in tests/test_slurm.py
            assert value is None, key
        elif key != "device":
            assert isinstance(value, int) and value >= 1, (key, value)


def test_training_rules_start_under_torchrun_with_train_processes(tmp_path):
    """Dry runs print each job's command: with train.processes 2 every training rule starts as 2
    torchrun processes even on CPU; with the paper config alone each training job asks for its
    `gpus` (2) and starts one process per GPU; on a one-GPU machine (`--resources gpu=1`, what the
    workstation profile sets there) it is one plain `dico` process under `dico gpu-run` (batches are
    global); the SLURM path is tests/test_slurm.py's, the workstation's tests/test_workstation.py's."""
    wf = _copy_workflow(tmp_path / "wf")
    commands = {}
    for name, configs, limit in (("rehearsal", CONFIGS, []), ("paper", CONFIGS[:1], []),
                                 ("one_gpu", CONFIGS[:1], ["--resources", "gpu=1"])):
        out = _snakemake("-n", "-p", "-F", *limit, "--configfile", *configs, "--cores", "2", cwd=wf, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        commands[name] = [line.split("Shell command:")[-1].strip() for line in (out.stdout + out.stderr).splitlines()
                          if re.search(r"\btrain (xe|scst_|dico)", line)]
    assert len(commands["rehearsal"]) == len(RUNS), commands["rehearsal"]
    for line in commands["rehearsal"]:
        assert line.startswith("exec torchrun --standalone --nproc_per_node=2 -m dico train "), line
    assert len(commands["paper"]) == len(commands["one_gpu"]) > 0
    for line in commands["paper"]:
        assert line.startswith("exec torchrun --standalone --nproc_per_node=2 -m dico train "), line
    for line in commands["one_gpu"]:
        assert line.startswith("exec dico gpu-run --gpus 1 -- dico train "), line


# -- slow: the DAG --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def paper_inputs(tmp_path_factory):
    """The served files, built once per session (the random ViT-L/14 alone is 0.86 GB)."""
    return F.build_inputs(tmp_path_factory.mktemp("paper_inputs"))


def stage_times(log: str) -> dict[str, dict]:
    """{rule: {"jobs": n, "job_s": summed job seconds, "span_s": first start to last end}} from
    Snakemake's log: each job block starts with a [timestamp] line and `rule|localrule NAME:` and its
    `jobid: N`, and ends with a [timestamp] line and `Finished jobid: N` (or `Finished job N.`)."""
    stamp, pending, start, rule_of, out = None, None, {}, {}, defaultdict(list)
    for line in log.splitlines():
        line = line.strip()
        m = re.fullmatch(r"\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]", line)
        if m:
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
            continue
        m = re.fullmatch(r"(?:local)?rule (\w+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.fullmatch(r"jobid: (\d+)", line)
        if m and pending:
            start[m.group(1)], rule_of[m.group(1)], pending = stamp, pending, None
            continue
        m = re.match(r"Finished job(?:id:)? (\d+)", line)
        if m and m.group(1) in start:
            out[rule_of[m.group(1)]].append((start[m.group(1)], stamp))
    return {rule: {"jobs": len(spans), "job_s": sum((b - a).total_seconds() for a, b in spans),
                   "span_s": (max(b for _, b in spans) - min(a for a, _ in spans)).total_seconds()}
            for rule, spans in out.items()}


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (snakemake and all its jobs)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.fixture(scope="module")
def rehearsal(paper_inputs, tmp_path_factory):
    work = _copy_workflow(tmp_path_factory.mktemp("rehearsal"))
    with F.LoopbackServer() as srv:
        (work / "config" / "rehearsal_urls.yaml").write_text(yaml.safe_dump(F.served_files(srv, paper_inputs)))
        t0, load0, cpu0 = time.time(), os.getloadavg()[0], _children_cpu_s()
        # targets first: --configfile takes every value after it
        out = _snakemake("all", "evaluate_official", "--cores", "2", "-p", "--show-failed-logs", "--configfile",
                         *CONFIGS, "config/rehearsal_urls.yaml", cwd=work, timeout=3600)
        wall, load1, cpu = time.time() - t0, os.getloadavg()[0], _children_cpu_s() - cpu0
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-8000:]
    stages = stage_times(log)
    (work / "results" / "rehearsal_stages.json").write_text(json.dumps(
        {"wall_s": wall, "cpu_s": cpu, "cores": os.cpu_count(), "load_avg_1m": [load0, load1], "stages": stages},
        indent=1))
    print(f"\nrehearsal: {wall:.0f} s for {sum(s['jobs'] for s in stages.values())} jobs on {os.cpu_count()} cores, "
          f"{cpu:.0f} CPU s in all (load average {load0:.1f} at the start, {load1:.1f} at the end); per stage "
          "(jobs, summed job s, span s):")
    for rule, s in sorted(stages.items(), key=lambda kv: -kv[1]["job_s"]):
        print(f"  {rule:28s} {s['jobs']:3d} {s['job_s']:7.0f} {s['span_s']:7.0f}")
    yield work, log, srv.requests
    # the big files (0.86 GB of ViT-L/14, ~1 GB of checkpoints per run) go; logs and outputs stay
    shutil.rmtree(work / "resources" / "weights", ignore_errors=True)
    for run_work in (work / "results" / "runs").glob("*/work"):
        shutil.rmtree(run_work, ignore_errors=True)


@pytest.mark.slow
def test_every_download_came_from_the_loopback_server(rehearsal):
    work, log, requests = rehearsal
    for path in ("/zips/train2014.zip", "/zips/val2014.zip", "/people/karpathy/deepimagesent/caption_datasets.zip",
                 "/clip/models/l14/ViT-L-14.pt", "/clip/models/b32/ViT-B-32.pt"):
        assert requests.count(path) == 1, (path, requests)
    for path in ("/drive/uc", "/drive/download"):  # PAC-S and the DiCO release, each behind Drive's page
        assert requests.count(path) == 2, (path, requests)
    for rule in ("download_coco_train2014", "download_coco_val2014", "download_karpathy", "download_clip_l14",
                 "download_clip", "download_pac", "download_official", "convert_official"):
        assert re.search(rf"rule {rule}:", log), rule
    images = F.coco_images()
    for part in ("train2014", "val2014"):  # unpacked in COCO's layout, one folder level
        folder = work / "resources" / "coco" / "images" / part  # (+ Snakemake's .snakemake_timestamp)
        have = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        assert have == sorted(im["filename"] for im in images if im["folder"] == part)


@pytest.mark.slow
def test_features_are_vit_l14_grids_in_fp16(rehearsal):
    work, _, _ = rehearsal
    splits = json.loads((work / "results" / "data" / "splits.json").read_text())["splits"]
    want = {s: len([im for im in F.coco_images() if {"restval": "train"}.get(im["split"], im["split"]) == s])
            for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == want
    for split, n in want.items():
        root = work / "results" / "features" / "clip_l14" / split
        index = json.loads((root / "index.json").read_text())
        assert (index["tokens"], index["dim"], index["dtype"], index["n_images"]) == (257, 1024, "float16", n)
        assert len(index["shards"]) == -(-n // 8)  # several shards (shard_size 8)
        rows = 0
        for shard in index["shards"]:
            arr = np.load(root / shard["file"], mmap_mode="r")
            assert arr.dtype == np.float16 and arr.shape[1:] == (257, 1024), (shard, arr.shape)
            assert np.isfinite(arr).all() and float(np.abs(arr).max()) > 0
            rows += arr.shape[0]
        assert rows == n


def _paper_captioner_config() -> dict:
    """What the official get_model (main.py) builds, with the real transformers config classes:
    GPT2Config() with add_cross_attention, n_layer 3, n_embd 512, n_head 8 (its argparse defaults),
    vocab = CLIP tokenizer vocabulary + 1 pad, and BertConfig(hidden 512, 3 layers, 8 heads,
    intermediate 2048); the ViT-L/14 width from open_clip's model config."""
    import open_clip
    from transformers import BertConfig, GPT2Config

    gpt = GPT2Config()
    gpt.n_layer, gpt.n_embd, gpt.n_head = 3, 512, 8
    bert = BertConfig(hidden_size=512, num_hidden_layers=3, intermediate_size=2048, num_attention_heads=8)
    bpe = open_clip.tokenizer.SimpleTokenizer().encoder  # CLIP's 49,408 BPE entries
    assert bert.hidden_dropout_prob == gpt.resid_pdrop and bert.intermediate_size == 4 * gpt.n_embd
    return {"feat_dim": open_clip.get_model_config("ViT-L-14")["vision_cfg"]["width"],
            "vocab_size": len(bpe) + 1, "pad_id": len(bpe), "bos_id": bpe["<start_of_text>"],
            "eos_id": bpe["<end_of_text>"], "d_model": gpt.n_embd, "enc_layers": bert.num_hidden_layers,
            "dec_layers": gpt.n_layer, "n_heads": gpt.n_head, "d_ff": bert.intermediate_size,
            "dropout": gpt.resid_pdrop, "max_enc_positions": bert.max_position_embeddings,
            "max_dec_positions": gpt.n_positions}


@pytest.mark.slow
def test_checkpoints_are_the_official_captioner_with_clips_full_vocabulary(rehearsal):
    import torch

    work, _, _ = rehearsal
    want = _paper_captioner_config()
    assert want["vocab_size"] == 49409 and want["feat_dim"] == 1024
    for run in SCORED:
        payload = torch.load(work / "results" / "runs" / run / "model.pt", map_location="cpu", weights_only=False)
        assert payload["model_config"] == want, run
        assert payload["backbone"] == {"name": "clip_l14", "dim": 1024, "tokens": 257}, run
        assert payload["tokenizer"] == {"clip_ids": None}, run  # the full CLIP vocabulary, no compaction
        assert payload["state_dict"]["decoder.wte.weight"].shape == (49409, 512), run


@pytest.mark.slow
def test_training_ran_as_two_torchrun_processes(rehearsal):
    work, log, _ = rehearsal
    assert log.count("exec torchrun --standalone --nproc_per_node=2 -m dico train ") == len(RUNS)
    for run in RUNS:
        text = (work / "results" / "logs" / "train" / f"{run}.log").read_text()
        assert "device cpu, 2 process(es)" in text, run
        rows = [json.loads(x) for x in (work / "results" / "runs" / run / "train_log.jsonl").read_text().splitlines()]
        assert any(r["phase"] == "train" for r in rows) and any(r["phase"] == "val" for r in rows), run
    dico_rows = [json.loads(x) for x in (work / "results" / "runs" / "dico" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < r["mean_len"] <= 29 for r in dico_rows if r["phase"] == "train")  # <= 30 with BOS


@pytest.mark.slow
def test_beams_are_batch_by_5_by_at_most_30(rehearsal):
    """The paper's decoding on the DAG's own test features with the DAG's DiCO model: [B, 5, <= 30]."""
    import torch

    from dico import config as C
    from dico.decoding import beam_search
    from dico.features import FeatureStore
    from dico.checkpoint import load_captioner

    work, _, _ = rehearsal
    cfg = C.validate(C.deep_merge(*[yaml.safe_load((work / c).read_text()) for c in CONFIGS]))
    dec = cfg["decoding"]
    assert (dec["beam_size"], dec["max_len"]) == (5, 30)
    model, tok, _ = load_captioner(work / "results" / "runs" / "dico" / "model.pt")
    feats = FeatureStore(work / "results" / "features" / "clip_l14" / "test" / "index.json")[[0, 1, 2]]
    with torch.no_grad():
        tokens, scores = beam_search(model, model.encode(feats), beam_size=dec["beam_size"], max_len=dec["max_len"])
    assert tokens.shape[:2] == (3, 5) and 2 <= tokens.shape[2] <= 30 and scores.shape == (3, 5)
    assert int(tokens.max()) < 49409 and (tokens[:, :, 0] == tok.bos_id).all()
    for run in RUNS:
        for split in ("val", "test"):
            caps = json.loads((work / "results" / "captions" / run / f"{split}.json").read_text())
            # max_len 30 counts BOS, so a caption has at most 29 tokens (a beam cut at max_len ends
            # without EOS). Re-encoding its text adds BOS and EOS and need not give the same ids (BPE
            # merges the words anew), so the bound is checked on the 29 words a 29-token caption can
            # hold at most (the official post-processing drops punctuation; nltk could split one
            # token such as "cannot" in two, which the rehearsal's captions do not contain).
            assert all(len(c["caption"].split()) <= 29 for c in caps), (run, split)


@pytest.mark.slow
def test_metrics_are_complete_with_provenance(rehearsal):
    work, _, _ = rehearsal
    n = {"val": 5, "test": 5}
    for run in SCORED:
        for split in ("val", "test"):
            m = json.loads((work / "results" / "metrics" / run / f"{split}.json").read_text())
            assert list(m["metrics"]) == METRIC_KEYS and m["n_images"] == n[split], (run, split)
            for key, value in m["metrics"].items():
                assert isinstance(value, float) or (value is None and m["reasons"].get(key)), (run, split, key)
            assert m["metrics"]["SPICE"] is None  # no CoreNLP jars in resources/spice
            prov = m["provenance"]
            assert prov["git_commit"] and prov["device"] and prov["run_provenance"]["spec"]["run"] == run


@pytest.mark.slow
def test_tables_and_figures_are_built(rehearsal):
    work, _, _ = rehearsal
    res = work / "results"
    main = (res / "tables" / "main.tex").read_text()
    assert r"\toprule" in main and r"\bottomrule" in main
    for ablation in ("beta", "tau", "k", "reward"):
        assert r"\toprule" in (res / "tables" / f"ablation_{ablation}.tex").read_text(), ablation
    for fig in ("training_curves", "tradeoff", "ablations", "qualitative"):
        assert (res / "figures" / f"{fig}.pdf").stat().st_size > 1000, fig
    assert not list(res.rglob("*.tmp")), "a temporary file survived"


@pytest.mark.slow
def test_dico_caption_official_gives_the_captions_evaluate_official_wrote(rehearsal):
    """`dico caption --official` on the rehearsal's release zip, at the paper's shapes: the ViT-L/14 grids
    computed on the fly from the test images give the captions that `evaluate_official` wrote from the
    cached features, string for string (all of them: the same batch as generate's)."""
    work, _, _ = rehearsal
    config = {}
    for name in (*CONFIGS, "config/rehearsal_urls.yaml"):  # as snakemake merges --configfile files
        config = C.deep_merge(config, yaml.safe_load((work / name).read_text()))
    (work / "config" / "merged.yaml").write_text(yaml.safe_dump(config))
    records = load_split(work / "results" / "data" / "splits.json", "test")
    wrote = {c["image_id"]: c["caption"] for c in json.loads(
        (work / "results" / "captions" / "dico_official" / "test.json").read_text())}
    out = subprocess.run(["dico", "caption", *(str(r.path) for r in records), "--official",
                          config["official"]["path"], "--sha256", config["official"]["sha256"], "--config",
                          "config/merged.yaml", "--out", "official_captions.json", "--threads", "2"],
                         cwd=work, capture_output=True, text=True, env=_env(), timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    got = {c["image_id"]: c["caption"] for c in json.loads((work / "official_captions.json").read_text())}
    assert got == {r.path.name: wrote[r.image_id] for r in records}


@pytest.mark.slow
def test_the_release_pickle_is_read_only_because_its_sha256_is_pinned(rehearsal):
    """The served release pickles an object besides its tensors (tests/paper_fixtures.py). The run above
    converted it because the config pins its sha256; with the pin removed the same conversion must
    refuse it, naming the file and both ways to allow it (files from the internet are data, not code)."""
    work, log, _ = rehearsal
    assert "dico convert-official" in log and "--sha256 " in log
    unpinned = work / "config" / "unpinned.yaml"
    unpinned.write_text(yaml.safe_dump({"official": {"sha256": None}}))
    out = _snakemake(f"results/runs/dico_official/model.pt", "--forcerun", "convert_official", "--cores", "1",
                     "--configfile", *CONFIGS, "config/rehearsal_urls.yaml", str(unpinned), cwd=work, timeout=600)
    assert out.returncode != 0
    text = (work / "results" / "logs" / "convert_official.log").read_text()
    assert "pytorch_model.bin" in text and "argparse.Namespace" in text, text[-2000:]
    assert "official.sha256" in text and "--trust-pickle" in text, text[-2000:]
