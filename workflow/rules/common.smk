# The config (validated against the schema, defaults filled: dico.config, so that `dico <step>
# --config ...` by hand resolves exactly the settings the rules do), the runs it asks for, and the input
# functions of the rules. Every path comes from dico.layout, the results layout in one place.
import json
import re

from dico import config as dc
from dico import launch
from dico import layout as L
from dico.download import Untracked, command_args


dc.validate(config, "config")

RUNS = dc.runs(config)
FINETUNE_RUNS = [r for r in RUNS if dc.run_spec(config, r)["method"] != "xe"]  # not xe, nor xe_seedN
OFFICIAL_RUN = "dico_official"  # the released DiCO checkpoint (official.smk), scored like our runs
BACKBONE = config["features"]["backbone"]
FEATURE_JOBS = config["features"]["jobs"]
EVAL_SPLITS = config["evaluate"]["splits"]
EVAL_MODELS = list(dc.evaluate_spec(config)["clip_models"])
ABLATIONS = dc.ablation_runs(config)
MAIN_RUNS = dc.main_runs(config)
# the main runs at every training seed (config `seeds`): the main table's rows are their mean ± std
MAIN_RUNS_ALL_SEEDS = [dc.seeded(config, r, s) for s in dc.seeds(config) for r in MAIN_RUNS]
# Extra evaluation sets: split "ood/<set>" in every path (dico.layout); they score the runs of `seed`.
OOD_SETS = list(config["evaluate"]["datasets"])
OOD_SPLITS = [L.ood_split(d) for d in OOD_SETS]
OOD_RUNS = dc.runs(config, all_seeds=False)
TABLES = [L.table("main")] + [L.table(f"ablation_{a}") for a in ABLATIONS] + ([L.table("ood")] if OOD_SETS else [])
FIGURE_NAMES = ["training_curves", "tradeoff", "ablations", "qualitative"]
FIGURES = [L.figure(f) for f in FIGURE_NAMES]
# the tools' downloads (dico.config.tool_downloads): SPICE's jars for evaluate, nltk's punkt_tab for generate
SPICE_JARS, NLTK_INPUTS = dc.tool_inputs(config, "spice"), dc.tool_inputs(config, "punkt_tab")


wildcard_constraints:
    split="|".join(["train", "val", "test"] + [re.escape(s) for s in OOD_SPLITS]),
    run="|".join(map(re.escape, RUNS + [OFFICIAL_RUN])),
    name="|".join(config["clip_models"]) or "none",
    part=r"\d+",
    dataset="|".join(map(re.escape, OOD_SETS)) or "none",


def spec(obj):
    """A step's settings as one shell-quoted JSON argument (Snakemake reruns a job when it changes)."""
    return json.dumps(obj, sort_keys=True)


def download_args(d):
    """`dico download` arguments of a dc.downloads() entry (untracked: dico.download.Untracked)."""
    s = config["data"]["downloads"]
    return command_args(d["url"], d["sha256"], retries=s["retries"], timeout=s["timeout_s"], **d["options"])


# `dico gpu-run` (dico.launch.gpu_params) where a local run has a GPU limit (--profile workstation, --resources gpu=N)
GPU_SLOTS = workflow.local_exec and not workflow.remote_exec and "gpu" in workflow.global_resources


def clip_model_path(name):
    return dc.clip_model_spec(config, name)["path"]


def coco_image_dirs():
    """The COCO image folders, prepare_splits' input. ancient(): a folder's mtime moves whenever
    anything inside it changes, which must not redo the whole DAG."""
    if config["data"]["source"] != "karpathy":
        return []
    return [ancient(f"{dc.image_root(config)}/{part}") for part in config["data"]["downloads"]["coco_images"]]


def split_name(wildcards):
    """The {split}'s name inside its split file (an extra set's file holds one split named after it)."""
    return L.split_source(wildcards.split)[1]


def split_inputs(wildcards):
    """cache_features' and cache_embeddings' inputs: the split file of {split}, and the CLIP model."""
    model = wildcards.name if "name" in wildcards.keys() else BACKBONE
    return {"splits": L.split_source(wildcards.split)[0], "checkpoint": clip_model_path(model)}


def train_clip_inputs(wildcards):
    """train_clip's inputs: the split file, and the checkpoint of the entry it starts from (train.init)."""
    init = dc.clip_model_spec(config, wildcards.name)["train"]["init"]
    return {"splits": L.splits_file(), **({"init": clip_model_path(init)} if init else {})}


def ood_inputs(wildcards):
    """prepare_ood's input: the set's annotations file (a demo set is generated: none)."""
    entry = config["evaluate"]["datasets"][wildcards.dataset]
    return {"annotations": entry["annotations"]} if entry["format"] != "demo" else {}


def finetune_embeddings(run):
    """(model, split) of the image embeddings a fine-tuning run reads: every clip_models entry it
    loads (reward and validation scorers) on val, then its reward model on train."""
    spec_ = dc.run_spec(config, run)
    reward = spec_["reward"].get("model")
    return [(n, "val") for n in spec_["clip_models"]] + ([(reward, "train")] if reward else [])


def finetune_inputs(wildcards):
    return {"init": L.run_model(dc.xe_run_of(config, wildcards.run)), "splits": L.splits_file(),
            "features_train": L.features_index(BACKBONE, "train"), "features_val": L.features_index(BACKBONE, "val"),
            "nltk": NLTK_INPUTS,
            "clip_models": [clip_model_path(n) for n in dc.run_spec(config, wildcards.run)["clip_models"]],
            "embeddings": [L.embeddings_file(n, s) for n, s in finetune_embeddings(wildcards.run)]}


def finetune_args(wildcards):
    """--clip-model NAME=PATH of each model, its val embeddings after it; then the reward's train ones."""
    embs = finetune_embeddings(wildcards.run)
    args = [f"--clip-model {n}={clip_model_path(n)} --embeddings {n}:val={L.embeddings_file(n, 'val')}"
            for n, s in embs if s == "val"]
    return " ".join(args + [f"--embeddings {n}:train={L.embeddings_file(n, 'train')}" for n, s in embs if s == "train"])


def scorer_inputs(runs, splits):
    """What scoring `runs` on `splits` reads: captions (run-major), checkpoints, split files (an extra
    set's links COCO's train split), the scorers' checkpoints and image embeddings."""
    return {"captions": [L.captions_file(r, s) for r in runs for s in splits], "model": [L.run_model(r) for r in runs],
            "splits": L.split_source(splits[0])[0], "train_splits": L.splits_file(),
            "clip_models": [clip_model_path(n) for n in EVAL_MODELS],
            "embeddings": [L.embeddings_file(n, s) for n in EVAL_MODELS for s in splits], "spice": SPICE_JARS}


def scorer_args(splits):
    """--clip-model NAME=PATH and --embeddings NAME:SPLIT=PATH of every scorer, as scorer_inputs lists them."""
    return " ".join(f"--clip-model {n}={clip_model_path(n)} " + " ".join(
        f"--embeddings {n}:{L.split_source(s)[1]}={L.embeddings_file(n, s)}" for s in splits) for n in EVAL_MODELS)


# COCO's splits whose image embeddings the DAG reads (rewards: train, validation: val, scorers: evaluate.splits)
EMBEDDING_SPLITS = [s for s in ("train", "val", "test")
                    if s in set(EVAL_SPLITS) | {s for r in FINETUNE_RUNS for _, s in finetune_embeddings(r)}]


def all_metrics(runs=None):
    return [L.metrics_file(r, s) for r in (runs or RUNS) for s in EVAL_SPLITS]


def all_ood_metrics():
    return [L.metrics_file(r, s) for r in OOD_RUNS for s in OOD_SPLITS]


def ablation_metrics(name):
    return [L.metrics_file(r, "test") for r in ABLATIONS.get(name, {}).values()]
