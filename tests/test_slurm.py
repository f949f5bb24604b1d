"""The SLURM side of the pipeline.

(a) `snakemake -n --profile slurm` plans the whole paper (config/paper.yaml) from the repository
    root, with GPUs requested by every GPU rule (and torchrun where a rule asks for several), and
    `snakemake --lint --profile slurm` is clean. Runs everywhere: a dry run needs no cluster. The plan
    includes the extra evaluation sets (nocaps val, Flickr30k test), whose twin rules ask for the GPUs
    of their originals, and features.jobs: N scatters feature caching over N GPU jobs per split.
(b) A real run of the demo DAG (tests/slurm/config.yaml: tiny data and models, features over 2 jobs
    per split, a second demo set out of domain) through the local one-node SLURM of .ci/slurm-up.sh
    with the slurm executor (tests/slurm/profile.yaml): every job goes through sbatch. Skipped, with
    the reason, where no SLURM controller answers.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from worlds import copy_workflow, dry_run_jobs

ROOT = Path(__file__).resolve().parents[1]
GPU_RULES = {"cache_features": 1, "cache_embeddings": 1, "train_xe": 2, "train_scst": 2, "train_dico": 2,
             "generate": 1, "evaluate": 1}
STAGES = ["prepare_splits", "cache_features", "cache_embeddings", "train_xe", "train_scst", "train_dico",
          "generate", "evaluate", "table_main", "table_ablation", "figure_training_curves", "figure_tradeoff",
          "figure_ablations", "figure_qualitative", "prepare_ood", "table_ood"]


def _env(**extra):
    """The test's environment with this venv's bin first (snakemake, dico and torchrun must resolve in
    the jobs too: sbatch --export=ALL), offline, and without a profile from the environment."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
    env.pop("SNAKEMAKE_PROFILE", None)
    env.update(extra)
    return env


def _copy_workflow(dst: Path) -> Path:
    return copy_workflow(dst, "slurm")


def _snakemake(*args, cwd, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or _env())


# -- (a) the paper's plan ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_plan(tmp_path_factory):
    """`snakemake -n --profile slurm` as a user types it, in a fresh copy of the repository (no results/,
    no resources/: everything from the downloads on is planned). No conda here: DICO_CONDA=auto
    leaves the software deployment out of the profile."""
    root = _copy_workflow(tmp_path_factory.mktemp("paper"))
    out = _snakemake("-n", "--profile", "slurm", cwd=root, env=_env(DICO_CONDA="auto"))
    text = out.stdout + out.stderr
    assert out.returncode == 0, ("`snakemake -n --profile slurm` failed (a MissingInputException for "
                                 "resources/... means the download_* rules are missing):\n" + text[-5000:])
    return root, text


def test_profile_plans_the_whole_paper(paper_plan):
    _, text = paper_plan
    assert "config/paper.yaml" in text  # the profile selected the paper
    jobs = dry_run_jobs(text)
    counts = Counter(j["rule"] for j in jobs)
    stats = dict((r, int(n)) for r, n in re.findall(r"^(\w+)\s+(\d+)$", text.split("Job stats:")[1], re.M))
    assert sum(counts.values()) == stats["total"], (counts, stats)
    assert stats["total"] >= 20, stats
    for rule in STAGES:
        assert counts[rule] >= 1, f"{rule} not planned: {dict(counts)}"
    downloads = {r for r in counts if r.startswith("download_")}
    # the inputs from the internet: Karpathy splits, COCO train2014 + val2014, CLIP / PAC-S weights
    assert {"download_karpathy", "download_coco_train2014", "download_coco_val2014"} <= downloads, downloads
    assert len(downloads) >= 5, downloads
    assert counts["train_xe"] == 1 and counts["train_scst"] == 3  # XE, SCST cider / clip_s / pac_s
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    runs = {"xe", *(f"scst_{r}" for r in paper["scst"]["rewards"]), "dico"}
    for name, values in paper["ablations"].items():
        default = {"beta": 0.2, "tau": 300, "k": 5, "reward": "pac_s"}[name]
        runs |= {f"dico_{name}-{v}" for v in values if v != paper.get("dico", {}).get(name, default)}
    assert counts["train_dico"] == len([r for r in runs if r.startswith("dico")]), dict(counts)
    assert counts["table_ablation"] == len(paper["ablations"]), dict(counts)
    # every run captioned and scored on val, test and each extra evaluation set (one job per run and split,
    # one rule for all: the sets' annotations are downloaded and their split files prepared)
    sets = list(paper["evaluate"]["datasets"])
    assert set(sets) == {"nocaps_val", "flickr30k_test"}
    splits = len(paper["evaluate"].get("splits", ["val", "test"])) + len(sets)
    assert counts["generate"] == counts["evaluate"] == len(runs) * splits, dict(counts)
    assert not {r for r in counts if r.endswith(("_ood", "_official")) and r not in ("prepare_ood", "table_ood")}
    assert counts["prepare_ood"] == len(sets) and counts["table_ood"] == 1
    assert {f"download_ood_{s}" for s in sets} <= downloads
    # the tools' data: SPICE's CoreNLP jars (checked against Maven Central's .sha1) and nltk's punkt_tab;
    # every evaluate job waits for the jars, every generate and training job for punkt_tab
    assert {"download_spice_stanford_corenlp_3_6_0", "download_spice_stanford_corenlp_3_6_0_models",
            "download_punkt_tab"} <= downloads, downloads
    inputs = {r: re.findall(rf"^(?:local)?rule {r}:\n\s+input: ([^\n]*)", text, re.M)
              for r in ("evaluate", "generate", "train_xe", "train_dico")}
    assert all(inputs.values()) and all("resources/spice/stanford-corenlp-3.6.0-models.jar" in i
                                        for i in inputs["evaluate"]), inputs["evaluate"][:1]
    assert all("resources/nltk_data/tokenizers/punkt_tab" in i for r in ("generate", "train_xe", "train_dico")
               for i in inputs[r]), inputs
    assert any("--sha1-url https://repo1.maven.org/maven2/edu/stanford/nlp/stanford-corenlp/3.6.0/" in c
               for c in [j["shell"] for j in jobs if j["rule"].startswith("download_spice")])
    shells = [j["shell"] for j in jobs]
    assert any("--splits results/data/ood/nocaps_val/splits.json --split nocaps_val" in c for c in shells)
    assert any(c.startswith("dico download zip") and "--member dataset_flickr30k.json" in c for c in shells)
    features = {re.search(r"--split (\S+)", j["shell"]).group(1) for j in jobs if j["rule"] == "cache_features"}
    assert features == {"train", "val", "test", *sets}


def test_the_paper_plan_trains_the_paper_model(paper_plan):
    """The profile's config/paper.yaml is layered on the Snakefile's demo config.yaml: nothing of the
    demo's sizes may leak into the paper's runs (paper.yaml's `model: {}` means the schema defaults)."""
    _, text = paper_plan
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    expected = {k: v["default"] for k, v in schema["properties"]["model"]["properties"].items() if "default" in v}
    expected.update(paper.get("model") or {})
    xe = next(j for j in dry_run_jobs(text) if j["rule"] == "train_xe")
    spec = json.loads(shlex.split(xe["shell"].split("--spec-json ", 1)[1])[0])
    assert spec["model"] == expected, f"train_xe model {spec['model']} != paper {expected}"
    assert spec["device"] == "cuda" and spec["xe"]["steps"] == paper["xe"]["steps"]


def test_gpu_jobs_ask_for_gpus_and_multi_gpu_jobs_use_torchrun(paper_plan):
    _, text = paper_plan
    jobs = dry_run_jobs(text)
    seen = set()
    for job in jobs:
        rule, res = job["rule"], job["resources"]
        if rule in GPU_RULES:
            seen.add(rule)
            assert res.get("gpu") == str(GPU_RULES[rule]), (rule, res)
            assert int(res["cpus_per_gpu"]) >= 4 and int(res["runtime"]) >= 60 and int(res["mem_mb"]) >= 16000, res
            command = job["shell"].removeprefix("exec ")  # training rules exec (SIGTERM reaches dico)
            if GPU_RULES[rule] > 1:
                assert command.startswith(f"torchrun --standalone --nproc_per_node={GPU_RULES[rule]} -m dico "), job
            else:
                assert command.startswith("dico "), job
        else:
            assert "gpu" not in res, (rule, res)  # CPU jobs stay off the GPUs
    assert seen == set(GPU_RULES), seen


def test_features_jobs_scatter_each_split_over_gpu_jobs(tmp_path_factory, paper_plan):
    """features.jobs: 4 on the paper: 4 cache_features GPU jobs per split on disjoint shard ranges
    (--part k --parts 4), then one gather_features per split on the submit host, without a GPU."""
    root, _ = paper_plan
    extra = tmp_path_factory.mktemp("jobs") / "jobs4.yaml"
    extra.write_text("features: {jobs: 4}\n")
    out = _snakemake("-n", "--profile", "slurm", "--configfile", "config/paper.yaml", str(extra), cwd=root,
                     env=_env(DICO_CONDA="auto"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    jobs = dry_run_jobs(out.stdout + out.stderr)
    splits = {"train", "val", "test", "nocaps_val", "flickr30k_test"}
    parts = [j for j in jobs if j["rule"] == "cache_features"]
    got = sorted((re.search(r"--split (\S+)", j["shell"]).group(1), re.search(r"--part (\d+) --parts 4", j["shell"]).group(1))
                 for j in parts)
    assert got == sorted((s, str(k)) for s in splits for k in range(4))
    assert all(j["resources"].get("gpu") == "1" for j in parts)
    gathers = [j for j in jobs if j["rule"] == "gather_features"]
    assert len(gathers) == len(splits) and all("gpu" not in j["resources"] and "--gather 4" in j["shell"]
                                                for j in gathers)


def test_the_released_checkpoint_and_the_extra_sets_get_the_gpus_of_their_rules(paper_plan):
    """The released DiCO checkpoint (run dico_official) and the extra evaluation sets are captioned and
    scored by the generate / evaluate rules themselves, so the profile's one entry per rule reaches them
    (no copies of a rule under other names to declare)."""
    root, text = paper_plan
    out = _snakemake("-n", "--profile", "slurm", "evaluate_official", cwd=root, env=_env(DICO_CONDA="auto"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    official = [j for j in dry_run_jobs(out.stdout + out.stderr) if "results/runs/dico_official/model.pt" in j["shell"]
                and j["rule"] in ("generate", "evaluate")]
    ood = [j for j in dry_run_jobs(text) if j["rule"] in ("generate", "evaluate") and "/ood/" in j["shell"]]
    assert len(official) == 4 and len(ood) > 0
    for job in official + ood:
        res = job["resources"]
        assert res.get("gpu") == "1" and int(res["cpus_per_gpu"]) >= 4 and int(res["mem_mb"]) >= 16000, job


def test_lint_is_clean_with_the_slurm_profile(paper_plan):
    root, _ = paper_plan
    out = _snakemake("--lint", "--profile", "slurm", cwd=root, env=_env(DICO_CONDA="auto"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_profile_uses_conda_only_where_conda_exists(tmp_path, monkeypatch):
    """slurm/profile.yaml turns on `software-deployment-method: conda` when a conda binary is on PATH
    (DICO_CONDA=auto), always with DICO_CONDA=yes, never with DICO_CONDA=no. Rendered with the parser
    snakemake itself uses for profiles."""
    from snakemake.profiles import ProfileConfigFileParser

    def render():
        with open(ROOT / "slurm" / "profile.yaml") as f:
            return ProfileConfigFileParser().parse(f)

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "conda").write_text("#!/bin/sh\nexit 0\n")
    (fake / "conda").chmod(0o755)
    no_conda_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                    if not (Path(p) / "conda").exists())
    cases = [("auto", str(fake) + os.pathsep + no_conda_path, True), ("auto", no_conda_path, False),
             ("yes", no_conda_path, True), ("no", str(fake), False)]
    for mode, path, conda in cases:
        monkeypatch.setenv("DICO_CONDA", mode)
        monkeypatch.setenv("PATH", path)
        monkeypatch.delenv("DICO_CONDA_PREFIX", raising=False)
        profile = render()
        assert profile["executor"] == "slurm" and profile["configfile"] == "config/paper.yaml"
        assert (profile.get("software-deployment-method") == "conda") is conda, (mode, profile)
        assert (profile.get("conda-prefix") == ".snakemake/conda") is conda, (mode, profile)
    monkeypatch.setenv("DICO_CONDA", "yes")
    monkeypatch.setenv("DICO_CONDA_PREFIX", "/shared/conda")
    assert render()["conda-prefix"] == "/shared/conda"


# -- (b) a real run through SLURM --------------------------------------------------------------------
def _slurm_ready() -> str | None:
    """None when a controller answers and a node can take jobs; otherwise why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo/sbatch) on PATH; run .ci/slurm-up.sh (root) to start a local cluster"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no SLURM controller answers; run .ci/slurm-up.sh"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()[:200]}): no SLURM controller; run .ci/slurm-up.sh"
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not any(state.startswith(("idle", "mix", "alloc")) for _, state in rows):
        return f"SLURM answers but no node is usable ({out.stdout.strip()}); run .ci/slurm-up.sh"
    if not {"cpu", "gpu"} <= {part.rstrip("*") for part, _ in rows}:
        return f"this SLURM lacks the cpu and gpu partitions of .ci/slurm-up.sh ({out.stdout.strip()})"
    return None


@pytest.mark.slow
@pytest.mark.slurm
def test_demo_dag_runs_through_local_slurm(tmp_path):
    reason = _slurm_ready()
    if reason:
        pytest.skip(reason)
    root = _copy_workflow(tmp_path)
    shutil.copy2(ROOT / "tests" / "slurm" / "config.yaml", root / "config" / "config.yaml")  # the whole config
    log = root / "snakemake.log"
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "all", "--profile",
                                 str(ROOT / "tests" / "slurm")], cwd=root, stdout=f, stderr=subprocess.STDOUT,
                                env=_env(OMP_NUM_THREADS="1"))
        try:
            rc = proc.wait(timeout=1200)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
    wall = time.monotonic() - start
    text = log.read_text()
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", text))
    if rc != 0:
        if submitted:  # leave nothing behind on the cluster
            subprocess.run(["scancel", *submitted.values()], capture_output=True, timeout=30)
        pytest.fail(f"snakemake via SLURM {'timed out' if rc is None else f'exited {rc}'} after {wall:.0f} s:\n"
                    + text[-6000:])
    print(f"\ndemo DAG through local SLURM: {wall:.0f} s wall, {len(submitted)} sbatch jobs")

    # the results of the whole DAG
    for path in ["results/tables/main.tex", "results/tables/ablation_beta.tex", "results/figures/tradeoff.pdf",
                 "results/figures/training_curves.pdf", "results/metrics/xe/test.json",
                 "results/metrics/scst_cider/test.json", "results/metrics/dico/test.json",
                 "results/tables/ood.tex", "results/tables/ood.csv"]:
        assert (root / path).stat().st_size > 0, path

    # the out-of-domain path: every run captioned and scored on the second demo set, table ood built
    config = yaml.safe_load((ROOT / "tests" / "slurm" / "config.yaml").read_text())
    (name,) = config["evaluate"]["datasets"]
    n = config["evaluate"]["datasets"][name]["demo"]["n_images"]
    for run in ("xe", "scst_cider", "dico"):
        m = json.loads((root / "results" / "metrics" / run / "ood" / f"{name}.json").read_text())
        assert m["split"] == name and m["n_images"] == n and m["run"] == run
        assert len(json.loads((root / "results" / "captions" / run / "ood" / f"{name}.json").read_text())) == n
    ood = root / "results" / "tables" / "ood.tex"
    assert config["evaluate"]["datasets"][name]["label"] in ood.read_text()
    assert [line.split(" & ")[0] for line in ood.read_text().splitlines() if line.startswith(("XE", "SCST", "DiCO"))] \
        and len(__import__("pandas").read_csv(ood.with_suffix(".csv"))) == 3
    assert str(root) not in ood.read_text() and str(root) not in ood.with_suffix(".csv").read_text()

    # features.jobs: 2: each split cached by 2 part jobs (sbatch), gathered into one index per split
    for split in ("train", "val", "test", f"ood/{name}"):
        index = json.loads((root / "results" / "features" / "clip" / split / "index.json").read_text())
        assert index["jobs"] == 2 and index["n_images"] == sum(s["count"] for s in index["shards"]), split
    assert len(re.findall(r"^localrule gather_features:", text, re.M)) == 4

    # every job but the local target rules went through sbatch, each with its own SLURM log
    planned = dict((r, int(n)) for r, n in re.findall(r"^(\w+)\s+(\d+)$", text.split("Job stats:")[1], re.M))
    local = re.findall(r"^localrule (\w+):", text, re.M)  # target rules (all) run on the submit host
    assert len(submitted) == planned["total"] - len(local) >= 20, (len(submitted), local, planned)
    logs = {p.stem: p for p in (root / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(submitted.values()) <= set(logs), set(submitted.values()) - set(logs)
    rules_in_slurm = {p.relative_to(root / ".snakemake" / "slurm_logs").parts[0] for p in logs.values()}
    assert {f"rule_{r}" for r in GPU_RULES} <= rules_in_slurm, rules_in_slurm
    part_logs = [p for p in logs.values() if "rule_cache_features" in p.parts]
    assert len(part_logs) == 8  # 4 splits x 2 parts, each its own SLURM job

    # train_dico asked for 2 (fake) GPUs and ran as 2 torchrun processes
    dico_log = next(p for p in logs.values() if "rule_train_dico" in p.parts)
    assert "--nproc_per_node=2" in dico_log.read_text()
    assert "2 process(es)" in (root / "results" / "logs" / "train" / "dico.log").read_text()
    jobid = dico_log.stem
    job = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True, timeout=30)
    if job.returncode == 0:  # finished jobs stay visible for MinJobAge (600 s with .ci/slurm-up.sh)
        assert "JobState=COMPLETED" in job.stdout and re.search(r"TresPerJob=gres:gpu:2\b", job.stdout), job.stdout

    # the controller knows the jobs (squeue: no accounting daemon needed); jobs finished longer ago
    # than MinJobAge have been purged, the recent ones must be there and COMPLETED
    q = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    states = dict(line.split() for line in q.stdout.splitlines() if line.strip())
    ours = {i: states[i] for i in submitted.values() if i in states}
    assert ours and set(ours.values()) == {"COMPLETED"}, (ours, q.stderr)
