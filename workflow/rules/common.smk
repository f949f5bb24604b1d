# Config validation (schema defaults filled in), the runs the config asks for, and path helpers.
# The logic lives in dico.config so that `dico <step> --config ...` by hand resolves exactly the
# same settings as the rules do.
import json
import re

from dico import config as dc
from dico import data as dd


dc.validate(config, "config")
try:
    dd.check_eval_sets(config)
except ValueError as e:
    raise dc.ConfigError(f"config: {e}") from None

RUNS = dc.runs(config)
FINETUNE_RUNS = [r for r in RUNS if dc.run_spec(config, r)["method"] != "xe"]  # not xe, nor xe_seedN
BACKBONE = config["features"]["backbone"]
EVAL_SPLITS = config["evaluate"]["splits"]
ABLATIONS = dc.ablation_runs(config)
# Extra evaluation sets (evaluate.datasets): their features and embeddings live under .../ood/<name>
# (the {dataset} wildcard), each from the set's own split file.
OOD_SETS = list(config["evaluate"]["datasets"])
FEATURE_JOBS = config["features"]["jobs"]
# {split} of the rules that serve COCO's splits and the sets alike (feature part jobs, the gather)
ANY_SPLIT = "train|val|test" + "".join(f"|ood/{re.escape(d)}" for d in OOD_SETS)


wildcard_constraints:
    split="train|val|test",
    run="|".join(map(re.escape, RUNS)),
    name="|".join(config["clip_models"]) or "none",
    reward="|".join(config["scst"]["rewards"]) or "none",
    dataset="|".join(map(re.escape, OOD_SETS)) or "none",


def spec(obj):
    """A step's settings as one shell-quoted JSON argument (Snakemake reruns a job when it changes)."""
    return json.dumps(obj, sort_keys=True)


def torch_launcher(wildcards, resources):
    """How a training job starts: `torchrun --standalone --nproc_per_node=N -m dico` with N =
    train.processes when the config sets that count (the CPU rehearsal, config/rehearsal.yaml: 2 gloo
    processes on CPU, as the 2-GPU SLURM jobs; 1 still starts torchrun), else
    N = the job's GPUs (resources.gpu, set by the slurm profile) when it has several; plain `dico`
    otherwise. Batches are global, so the result does not depend on N."""
    n = config["train"]["processes"]
    if n is None:
        n = int(getattr(resources, "gpu", 0) or 0)
        if n <= 1:
            return "dico"
    return f"torchrun --standalone --nproc_per_node={n} -m dico"


def threads_per_process(wildcards, threads, resources):
    """`--threads` of each training process: the job's threads shared by the processes torchrun starts
    (2 CPU processes of a 2-thread job get 1 each instead of oversubscribing the cores)."""
    n = config["train"]["processes"] or max(1, int(getattr(resources, "gpu", 0) or 0))
    return max(1, threads // n)


def clip_model_path(name):
    return dc.clip_model_spec(config, name)["path"]


def train_clip_inputs(wildcards):
    """train_clip's inputs: the split file, and the checkpoint of the entry it starts from (train.init)."""
    init = dc.clip_model_spec(config, wildcards.name)["train"]["init"]
    return {"splits": splits_file(), **({"init": clip_model_path(init)} if init else {})}


def karpathy_source():
    """The Karpathy-format split file: generated for the demo, dataset_coco.json for COCO."""
    if config["data"]["source"] == "demo":
        return "results/data/demo/dataset_demo.json"
    return config["data"]["karpathy_json"]


def image_root():
    if config["data"]["source"] == "demo":
        return "results/data/demo/images"
    return config["data"]["image_root"]


def splits_file():
    return "results/data/splits.json"


def features_index(split):
    return f"results/features/{BACKBONE}/{split}/index.json"


def feature_parts(split):
    """The part markers of a split's features when features.jobs > 1 (rule gather_features' inputs)."""
    return [f"results/features/{BACKBONE}/{split}/part-{k}-of-{FEATURE_JOBS}.json" for k in range(FEATURE_JOBS)]


def ood_splits_file(name):
    return f"results/data/ood/{name}/splits.json"


def split_source(split):
    """(split file, split name inside it) of a {split} wildcard: COCO's train/val/test, or ood/<name>
    for an evaluation set, whose split file holds one split called <name>."""
    if split.startswith("ood/"):
        return ood_splits_file(split[4:]), split[4:]
    return splits_file(), split


def ood_captions(run, name):
    return f"results/captions/{run}/ood/{name}.json"


def ood_metrics(run, name):
    return f"results/metrics/{run}/ood/{name}.json"


def all_ood_metrics(runs=None):
    """The extra evaluation sets score the runs of `seed` (not every seed of `seeds`)."""
    return [ood_metrics(r, d) for r in (runs or dc.runs(config, all_seeds=False)) for d in OOD_SETS]


def ood_inputs(wildcards):
    """prepare_ood's input: the set's annotations file (a demo set is generated: none)."""
    entry = config["evaluate"]["datasets"][wildcards.dataset]
    return {"annotations": entry["annotations"]} if entry["format"] != "demo" else {}


def split_inputs(wildcards):
    """The feature part jobs' and gather's inputs: the split file of {split}, and the backbone."""
    return {"splits": split_source(wildcards.split)[0], "checkpoint": clip_model_path(BACKBONE)}


def embeddings_file(name, split):
    return f"results/embeddings/{name}/{split}.pt"


def run_clip_models(run):
    """clip_models a fine-tuning run loads (reward model + validation scorers)."""
    return list(dc.run_spec(config, run).get("clip_models", {}))


def finetune_inputs(wildcards):
    spec_ = dc.run_spec(config, wildcards.run)
    names = list(spec_["clip_models"])
    reward_model = spec_["reward"].get("model")
    files = {
        "init": f"results/runs/{dc.xe_run_of(config, wildcards.run)}/model.pt",
        "splits": splits_file(),
        "features_train": features_index("train"),
        "features_val": features_index("val"),
    }
    for n in names:
        files[f"ckpt_{n}"] = clip_model_path(n)
        files[f"emb_{n}_val"] = embeddings_file(n, "val")
    if reward_model:
        files[f"emb_{reward_model}_train"] = embeddings_file(reward_model, "train")
    return files


def finetune_args(wildcards, input):
    """--clip-model / --embeddings arguments matching finetune_inputs."""
    args = []
    for key, path in input.items():
        if key.startswith("ckpt_"):
            args.append(f"--clip-model {key[5:]}={path}")
        elif key.startswith("emb_"):
            name, split = key[4:].rsplit("_", 1)
            args.append(f"--embeddings {name}:{split}={path}")
    return " ".join(args)


EVAL_MODELS = list(dc.evaluate_spec(config)["clip_models"])


def embedding_splits():
    """The splits whose image embeddings the DAG reads of some clip_models entry, in split order:
    train for a fine-tuning reward, val for fine-tuning validation, the evaluation splits for the
    scorers. cache_embeddings computes them all in one job per model (one model load); in the demo
    and the paper every embedded model needs all three."""
    needed = set(EVAL_SPLITS)
    for run in FINETUNE_RUNS:
        needed.add("val")
        if dc.run_spec(config, run)["reward"].get("model"):
            needed.add("train")
    return [s for s in ("train", "val", "test") if s in needed]


EMBEDDING_SPLITS = embedding_splits()


def scorer_inputs(runs):
    """What scoring `runs` reads: their captions (run-major) and checkpoints, the split file, the
    scorers' checkpoints and image embeddings (evaluate_args names them)."""
    files = {
        "captions": [f"results/captions/{r}/{s}.json" for r in runs for s in EVAL_SPLITS],
        "model": [f"results/runs/{r}/model.pt" for r in runs],
        "splits": splits_file(),
    }
    for n in EVAL_MODELS:
        files[f"ckpt_{n}"] = clip_model_path(n)
        for s in EVAL_SPLITS:
            files[f"emb_{n}_{s}"] = embeddings_file(n, s)
    return files


def evaluate_inputs(wildcards):
    return scorer_inputs([wildcards.run])


def evaluate_runs_inputs(wildcards):
    """evaluate_runs (evaluate.group_runs): every run's captions and checkpoint."""
    return scorer_inputs(RUNS)


def evaluate_args(wildcards, input):
    args = []
    for n in EVAL_MODELS:
        args.append(f"--clip-model {n}={input[f'ckpt_{n}']}")
        args += [f"--embeddings {n}:{s}={input[f'emb_{n}_{s}']}" for s in EVAL_SPLITS]
    return " ".join(args)


def evaluate_ood_inputs(wildcards):
    files = {
        "captions": [ood_captions(wildcards.run, wildcards.dataset)],
        "model": f"results/runs/{wildcards.run}/model.pt",
        "splits": ood_splits_file(wildcards.dataset),
        "train_splits": splits_file(),
    }
    for n in EVAL_MODELS:
        files[f"ckpt_{n}"] = clip_model_path(n)
        files[f"emb_{n}"] = embeddings_file(n, f"ood/{wildcards.dataset}")
    return files


def evaluate_ood_args(wildcards, input):
    return " ".join(
        f"--clip-model {n}={input[f'ckpt_{n}']} --embeddings {n}:{wildcards.dataset}={input[f'emb_{n}']}"
        for n in EVAL_MODELS
    )


def metrics_file(run, split):
    return f"results/metrics/{run}/{split}.json"


def all_metrics(runs=None):
    return [metrics_file(r, s) for r in (runs or RUNS) for s in EVAL_SPLITS]


def ablation_metrics(name):
    return [metrics_file(r, "test") for r in ABLATIONS.get(name, {}).values()]


MAIN_RUNS = dc.main_runs(config)
# the main runs at every training seed (config `seeds`): the main table's rows are their mean ± std
MAIN_RUNS_ALL_SEEDS = [dc.seeded(config, r, s) for s in dc.seeds(config) for r in MAIN_RUNS]
TABLES = ["results/tables/main.tex"] + [f"results/tables/ablation_{a}.tex" for a in ABLATIONS]
TABLES += ["results/tables/ood.tex"] if OOD_SETS else []
FIGURE_NAMES = ["training_curves", "tradeoff", "ablations", "qualitative"]
FIGURES = [f"results/figures/{f}.pdf" for f in FIGURE_NAMES]


# -- downloads (workflow/rules/download.smk) ------------------------------------------------------
import shlex


class Untracked:
    """A param that reaches the shell command but not Snakemake's provenance record (which keeps
    builtin-typed params only): editing a download's URL, pinning its sha256 or changing retries in
    the config must not re-download a file that exists, nor rerun everything built from it."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


def download_args(url, sha256=None, **extra):
    """`dico download` arguments: source, checks and retry settings (untracked, see Untracked)."""
    d = config["data"]["downloads"]
    args = [f"--url {shlex.quote(url)}", f"--retries {d['retries']}", f"--timeout {d['timeout_s']}"]
    if sha256:
        args.append(f"--sha256 {shlex.quote(sha256)}")
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args.append(f"{flag} {shlex.quote(str(value))}")
    return Untracked(" ".join(args))


def clip_downloads():
    """{name: entry} of the clip_models to download (source file with a url), one per distinct
    path (two names may share a checkpoint)."""
    out, paths = {}, set()
    for name, m in config["clip_models"].items():
        if m["source"] == "file" and m.get("url") and m["path"] not in paths:
            out[name] = m
            paths.add(m["path"])
    return out


def coco_archive(part):
    return f"{config['data']['downloads']['archive_dir']}/{part}.zip"


def coco_image_dirs():
    """The COCO image folders (downloaded when missing), for prepare_splits' input. ancient(): a
    folder's mtime moves whenever anything inside it changes, which must not redo the whole DAG."""
    if config["data"]["source"] != "karpathy":
        return []
    return [ancient(f"{image_root()}/{part}") for part in config["data"]["downloads"]["coco_images"]]


def ood_downloads():
    """{name: entry} of the evaluation sets whose annotations a download rule fetches (url set)."""
    return {n: d for n, d in config["evaluate"]["datasets"].items() if d["format"] != "demo" and d["url"]}


def download_targets():
    """Every file or folder a download rule makes (target download_all)."""
    files = [m["path"] for m in clip_downloads().values()]
    files += [d["annotations"] for d in ood_downloads().values()]
    if config["data"]["source"] == "karpathy":
        files += [config["data"]["karpathy_json"]]
        files += [f"{image_root()}/{part}" for part in config["data"]["downloads"]["coco_images"]]
    return files


OFFICIAL_RUN = "dico_official"


# -- twin rules ask the cluster for what their original asks for ---------------------------------
# A `use rule ... as` copy (generate_ood, generate_official, ...) has a new name, and a profile's
# set-resources / set-threads are keyed by name. Without this, the copies of the GPU rules would get
# the default resources (no GPU) under --profile slurm; an explicit entry for a copy in the profile
# still wins. Snakemake reads these settings as it defines each rule, so this runs before any is.
RESOURCE_TWINS = {
    "cache_features_ood": "cache_features",
    "cache_embeddings_ood": "cache_embeddings",
    "generate_ood": "generate",
    "evaluate_ood": "evaluate",
    "generate_official": "generate",
    "evaluate_dico_official": "evaluate",
    "generate_runs": "generate",
    "evaluate_runs": "evaluate",
}


def share_profile_resources(twins):
    settings = workflow.resource_settings
    for field in ("overwrite_resources", "overwrite_threads"):
        mapping = dict(getattr(settings, field) or {})
        for twin, base in twins.items():
            if base in mapping and twin not in mapping:
                mapping[twin] = mapping[base]
        setattr(settings, field, mapping)
        settings.__dict__.pop(f"_parsed_{field}", None)  # a cached parse of the old mapping, if any


share_profile_resources(RESOURCE_TWINS)
