"""Configuration: schema validation with defaults, and the runs the config asks for.

The schema (workflow/schemas/config.schema.yaml) is the single description of every key. Both the
Snakefile and every `dico` command validate against it, so a typo fails at parse time with the key,
the allowed values and the file, not an hour into a cluster job.

Runs: `xe`; `scst_<reward>` per entry of scst.rewards; `dico`; and one `dico_<name>-<value>` per
ablation value that differs from the dico default. With `seeds`, each of the main runs (xe, scst_*,
dico) also runs at every other seed N as `<run>_seedN`, fine-tuned from `xe_seedN`.
`run_spec(config, run)` resolves one run to the settings it needs - only those, so that editing an unrelated key does not retrain it (Snakemake
reruns a job when its params change).
"""
from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from . import layout
from .eval_sets import check_eval_sets
from .own_data import size_problems

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
ABLATABLE = ("beta", "tau", "k", "reward")


class ConfigError(ValueError):
    pass


@lru_cache(maxsize=1)
def schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def _validator():
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def fill_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, sch)

    return validators.extend(base, {"properties": fill_defaults})(schema())


def validate(config: dict, source: str = "config") -> dict:
    """Fill defaults in place and check the config; raise ConfigError naming key and fix."""
    seeds_ = config.get("seeds")
    if isinstance(seeds_, list) and all(isinstance(x, str) and x.strip().isdigit() for x in seeds_):
        # `snakemake --config seeds=[0,1,2]` parses lists with YAML's BaseLoader: all strings
        config["seeds"] = [int(x) for x in seeds_]
    errors = sorted(_validator().iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: invalid configuration (schema: {SCHEMA.relative_to(REPO)})"]
        for e in errors[:10]:
            key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            lines.append(f"  - {key}: {_explain(e)}")
        raise ConfigError("\n".join(lines))
    if config["evaluate"]["datasets"] is None:  # null switches the sets of an underlying config file off
        config["evaluate"]["datasets"] = {}
    _check_references(config, source)
    try:
        check_eval_sets(config)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def _explain(e) -> str:
    if e.validator == "enum":
        return f"{e.instance!r} is not allowed; choose one of {', '.join(map(repr, e.validator_value))}"
    if e.validator == "additionalProperties":
        allowed = sorted(e.schema.get("properties", {}))
        extra = re.findall(r"'([^']+)' was unexpected", e.message) or [e.message]
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {', '.join(map(repr, extra))}{hint}"
    if e.validator == "required":
        return e.message
    return f"{e.message}"


# The keys of clip_models.<name>.train that fix a demo stand-in's architecture (a model that starts
# from another one's weights, train.init, must have the same values).
CLIP_ARCHITECTURE_KEYS = ("embed_dim", "patch_size", "vision_width", "vision_layers", "text_width",
                          "text_layers", "context_length")


def _check_references(config: dict, source: str) -> None:
    """Names that point into clip_models / rewards must exist."""
    models, rewards = config.get("clip_models", {}), config.get("rewards", {})
    problems = []

    def need_model(key: str, name: str):
        if name not in models:
            problems.append(f"{key}: {name!r} is not a clip_models entry (have: {', '.join(models) or 'none'})")

    need_model("features.backbone", config["features"]["backbone"])
    for metric in ("clip_s", "pac_s"):
        need_model(f"evaluate.{metric}.model", config["evaluate"][metric]["model"])
    for name, r in rewards.items():
        if r["type"] == "clip":
            if "model" not in r:
                problems.append(f"rewards.{name}: type clip needs a model")
            else:
                need_model(f"rewards.{name}.model", r["model"])
    for key, names in [("scst.rewards", config["scst"]["rewards"]),
                       ("dico.reward", [config["dico"]["reward"]]),
                       ("ablations.reward", config["ablations"].get("reward", []))]:
        for n in names:
            if n not in rewards:
                problems.append(f"{key}: {n!r} is not a rewards entry (have: {', '.join(rewards)})")
    for name, m in models.items():
        if m["source"] == "demo" and config["data"]["source"] == "karpathy":  # trained on the split's train images
            problems.append(f"clip_models.{name}: source demo needs data.source demo or folder (COCO needs "
                            "real CLIP weights: source file)")
        if m["source"] == "file" and not m.get("path"):
            problems.append(f"clip_models.{name}: source file needs a path (where the checkpoint is or will be downloaded)")
        init = m.get("train", {}).get("init")
        if m["source"] == "demo" and init is not None:
            key = f"clip_models.{name}.train.init"
            if init == name or models.get(init, {}).get("source") != "demo":
                problems.append(f"{key}: {init!r} is not another demo clip_models entry (have: "
                                f"{', '.join(n for n, o in models.items() if o['source'] == 'demo' and n != name) or 'none'})")
            else:
                differ = [k for k in CLIP_ARCHITECTURE_KEYS if m["train"][k] != models[init]["train"][k]]
                if differ:
                    problems.append(f"{key}: {name} starts from {init}'s weights, so its architecture must be "
                                    f"{init}'s; set " + ", ".join(f"clip_models.{name}.train.{k} to "
                                                                f"{models[init]['train'][k]}" for k in differ))
    problems += _missing_inputs(config)
    if problems:
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(f"  - {p}" for p in problems))


def _missing_inputs(config: dict) -> list[str]:
    """COCO's inputs are downloaded only to where the schema puts them: a path the config changes
    must exist (a mistyped path would otherwise be planned as a download into the typo). Your own
    data set's folder and captions file must exist."""
    if config["data"]["source"] == "folder":
        return _folder_problems(config["data"]["folder"])
    if config["data"]["source"] != "karpathy":
        return []
    props, problems = schema()["properties"]["data"]["properties"], []
    for key in ("karpathy_json", "image_root"):
        value, default = config["data"][key], props[key]["default"]
        if value != default and not Path(value).exists():
            problems.append(f"data.{key}: {value} does not exist; correct the path to your copy, or leave the key "
                            f"out and `snakemake download_all` fetches it to {default}")
    return problems


def _folder_problems(folder: dict) -> list[str]:
    problems = []
    for key, what in (("images", "the folder of your images"),
                      ("captions", "your captions file (.csv, .json, .jsonl)")):
        if not folder[key]:
            problems.append(f"data.folder.{key}: not set; data.source folder needs {what}")
        elif not Path(folder[key]).exists():
            problems.append(f"data.folder.{key}: {folder[key]} does not exist; correct the path to {what}")
    return problems + size_problems(folder["val"], folder["test"])


def load(path: str | Path, overrides: dict | None = None) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        config = deep_merge(config, overrides)
    return validate(config, str(path))


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -- runs ----------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def ablation_runs(config: dict) -> dict[str, dict[str, str]]:
    """{ablation name: {formatted value: run name}}, the default value mapping to 'dico'."""
    out = {}
    for name, values in config["ablations"].items():
        default = config["dico"][name]
        out[name] = {_fmt(v): ("dico" if v == default else f"dico_{name}-{_fmt(v)}") for v in values}
    return out


SEEDED_RUN = re.compile(r"^(?P<base>.+)_seed(?P<seed>\d+)$")


def main_runs(config: dict) -> list[str]:
    """The runs of the main table, at the config's `seed`."""
    return ["xe"] + [f"scst_{r}" for r in config["scst"]["rewards"]] + ["dico"]


def seeds(config: dict) -> list[int]:
    """The training seeds of the main runs: `seeds`, or just `seed`."""
    chosen = config.get("seeds") or [config["seed"]]
    if config["seed"] not in chosen:
        raise ConfigError(f"config: seeds {chosen} must include seed ({config['seed']}): the ablation runs and "
                          f"the training-curves figure use the runs of `seed`; add it or set seed to one of them")
    return chosen


def seeded(config: dict, run: str, seed: int) -> str:
    """The name of `run` at training seed `seed`: the run itself at the config's seed, else <run>_seedN."""
    return run if seed == config["seed"] else f"{run}_seed{seed}"


def runs(config: dict, all_seeds: bool = True) -> list[str]:
    """Every training run the config asks for, in DAG order; `all_seeds=False`: at `seed` only."""
    names = main_runs(config)
    for points in ablation_runs(config).values():
        names += [r for r in points.values() if r not in names]
    if all_seeds:
        names += [seeded(config, r, s) for s in seeds(config) if s != config["seed"] for r in main_runs(config)]
    return names


def xe_run_of(config: dict, run: str) -> str:
    """The XE run a fine-tuning run starts from: the XE run of its own seed."""
    m = SEEDED_RUN.match(run)
    return seeded(config, "xe", int(m["seed"])) if m else "xe"


def run_spec(config: dict, run: str) -> dict:
    """Everything run `run` needs (and nothing else), with its method-specific settings merged."""
    m = SEEDED_RUN.match(run)
    if m:  # <run>_seedN: the main run `run` at training seed N
        base, seed = m["base"], int(m["seed"])
        if base not in main_runs(config) or seed not in seeds(config) or seed == config["seed"]:
            others = [s for s in seeds(config) if s != config["seed"]]
            raise ConfigError(f"run {run!r}: seeded runs are <run>_seedN for the main runs "
                              f"({', '.join(main_runs(config))}) and N in seeds other than seed "
                              f"({others or 'none: set seeds, e.g. --config seeds=[0,1,2]'})")
        return {**run_spec(config, base), "run": run, "seed": seed}
    common = {"run": run, "seed": config["seed"], "device": config["device"],
              "deterministic": config["deterministic"], "model": config["model"],
              "decoding": config["decoding"], "train": config["train"]}
    if run == "xe":
        return {**common, "method": "xe", "xe": config["xe"]}
    if run.startswith("scst_"):
        reward = run[len("scst_"):]
        if reward not in config["scst"]["rewards"]:
            raise ConfigError(f"run {run!r}: {reward!r} is not in scst.rewards {config['scst']['rewards']}")
        return _with_clip_models(config, {
            **common, "method": "scst", "scst": {**config["scst"], "reward": reward},
            "reward": config["rewards"][reward], "selection": _selection_metrics(config)})
    if run == "dico" or run.startswith("dico_"):
        settings = dict(config["dico"])
        if run != "dico":
            name, _, value = run[len("dico_"):].partition("-")
            points = ablation_runs(config).get(name, {})
            if value not in points:
                raise ConfigError(f"run {run!r} is not in the ablation grid (ablations.{name}: "
                                  f"{list(points) or 'not configured'})")
            settings[name] = yaml.safe_load(value) if name != "reward" else value
        return _with_clip_models(config, {
            **common, "method": "dico", "dico": settings,
            "reward": config["rewards"][settings["reward"]], "selection": _selection_metrics(config)})
    raise ConfigError(f"unknown run {run!r}; runs of this config: {', '.join(runs(config))}")


def _selection_metrics(config: dict) -> dict:
    """What fine-tuning validation needs: the CLIP-S/PAC-S scorers (models, w, prefix of `evaluate`),
    the form it computes them in and whether the start model may be selected (config `selection`)."""
    return {"clip_s": config["evaluate"]["clip_s"], "pac_s": config["evaluate"]["pac_s"], **config["selection"]}


def _with_clip_models(config: dict, spec: dict) -> dict:
    spec["clip_models"] = {n: clip_model_spec(config, n) for n in clip_models_of(spec)}
    return spec


def clip_models_of(spec: dict) -> list[str]:
    """clip_models entries a run needs at training time (reward and validation scorers)."""
    names = []
    if spec["method"] in ("scst", "dico"):
        if spec["reward"]["type"] == "clip":
            names.append(spec["reward"]["model"])
        names += [spec["selection"][m]["model"] for m in ("clip_s", "pac_s")]
    return list(dict.fromkeys(names))


# -- what each step needs (passed to `dico <step> --spec-json` by the Snakefile) -----------------
def karpathy_file(config: dict) -> str:
    """The Karpathy-format file of the captioner's data: generated for the demo, dataset_coco.json for COCO."""
    return layout.demo_karpathy() if config["data"]["source"] == "demo" else config["data"]["karpathy_json"]


def image_root(config: dict) -> str:
    return layout.demo_images() if config["data"]["source"] == "demo" else config["data"]["image_root"]


def folder_spec(config: dict) -> dict:
    """What prepare_splits needs of your own data set (data.source folder): data.folder and data.max_refs."""
    if config["data"]["source"] != "folder":
        raise ConfigError(f"data.source is {config['data']['source']!r}, not folder: give --karpathy-json and "
                          "--image-root (COCO), --eval-set NAME, or a config with data.source folder")
    return {**config["data"]["folder"], "max_refs": config["data"]["max_refs"]}


def demo_spec(config: dict) -> dict:
    return dict(config["data"]["demo"])


def clip_model_spec(config: dict, name: str) -> dict:
    if name not in config["clip_models"]:
        raise ConfigError(f"{name!r} is not a clip_models entry (have: {', '.join(config['clip_models'])})")
    spec = {"name": name, "device": config["device"], **config["clip_models"][name]}
    if spec["source"] == "demo":
        spec["image_size"] = config["data"]["demo"]["image_size"]
        spec["path"] = layout.clip_model(name)  # trained by the pipeline
    return spec


def eval_set_spec(config: dict, name: str) -> dict:
    """What prepare-splits needs to build evaluation set `name` of a validated config (what changes the
    split file's content, and nothing else: its table label and the fetch settings are left out)."""
    sets = config["evaluate"]["datasets"]
    if name not in sets:
        raise KeyError(f"{name!r} is not an evaluate.datasets entry (have: {', '.join(sets) or 'none'})")
    entry = sets[name]
    spec = {"name": name, **{k: v for k, v in entry.items() if k not in ("label", "url", "sha256", "member")}}
    if entry["format"] == "demo":
        spec["demo"] = {**entry["demo"], "image_size": config["data"]["demo"]["image_size"],
                        "refs_per_image": config["data"]["demo"]["refs_per_image"]}
    else:
        spec.pop("demo", None)
    return spec


def features_spec(config: dict) -> dict:
    return {**config["features"], "model": clip_model_spec(config, config["features"]["backbone"])}


def generate_spec(config: dict) -> dict:
    return {"device": config["device"], "decoding": config["decoding"], "amp": config["train"]["amp"]}


def evaluate_spec(config: dict) -> dict:
    ev = config["evaluate"]
    models = dict.fromkeys([ev["clip_s"]["model"], ev["pac_s"]["model"]])
    return {"device": config["device"], "meteor": ev["meteor"], "spice_jar_dir": ev["spice_jar_dir"],
            "spice_cache": ev["spice_cache"],
            "clip_s": ev["clip_s"], "pac_s": ev["pac_s"],
            "clip_models": {n: clip_model_spec(config, n) for n in models}}


def ood_report_spec(config: dict) -> dict:
    """What table ood needs of a validated config: row order and each evaluation set's title."""
    return {"scst_rewards": config["scst"]["rewards"],
            "datasets": {name: {"label": d["label"] or name, "format": d["format"],
                                **({"variant": d["demo"]["variant"]} if d["format"] == "demo" else {})}
                         for name, d in config["evaluate"]["datasets"].items()}}


# -- downloads (workflow/rules/download.smk) -----------------------------------------------------
def downloads(config: dict) -> list[dict]:
    """Every input the config's download rules fetch when it is missing: {"name" (the rule is
    download_<name>), "out", "folder" (a folder of unpacked images), "kind" (file | zip), "url",
    "sha256", "options" (--archive, --member, --keep-archive)}. The CLIP weights (one per distinct
    path: two names may share a checkpoint), COCO's Karpathy file and image zips, the annotations of
    the extra evaluation sets that have a url, SPICE's CoreNLP jars and nltk's punkt_tab (the tools'
    data: `tool_downloads`); the released DiCO checkpoint is the official stage's."""
    dl, out, paths = config["data"]["downloads"], [], set()
    for name, m in config["clip_models"].items():
        if m["source"] == "file" and m.get("url") and m["path"] not in paths:
            out.append(_download(name, m["path"], "file", m["url"], m["sha256"]))
            paths.add(m["path"])
    if config["data"]["source"] == "karpathy":
        k = dl["karpathy"]
        out.append(_download("karpathy", config["data"]["karpathy_json"], "zip", k["url"], k["sha256"],
                             archive=f"{dl['archive_dir']}/caption_datasets.zip", member=k["member"],
                             keep_archive=dl["keep_archives"]))
        for part, z in dl["coco_images"].items():
            out.append(_download(f"coco_{part}", f"{config['data']['image_root']}/{part}", "zip", z["url"], z["sha256"],
                                 folder=True, archive=f"{dl['archive_dir']}/{part}.zip", keep_archive=dl["keep_archives"]))
    for name, d in config["evaluate"]["datasets"].items():
        if d["format"] == "demo" or not d["url"]:
            continue
        # a zip entry (Flickr30k / Flickr8k: Karpathy's caption_datasets.zip) gets an archive of its own, so
        # that it never shares a .part file with download_karpathy
        options = (dict(archive=f"{dl['archive_dir']}/ood_{name}.zip", member=d["member"], keep_archive=dl["keep_archives"])
                   if d["member"] else {})
        out.append(_download(f"ood_{name}", d["annotations"], "zip" if d["member"] else "file", d["url"], d["sha256"],
                             **options))
    return out + tool_downloads(config)


def tool_downloads(config: dict) -> list[dict]:
    """The data the metrics' and post-processing's tools read: the Stanford CoreNLP 3.6.0 jars SPICE
    needs, into evaluate.spice_jar_dir (rules download_spice_<jar>, each checked against the sha1 Maven
    Central publishes beside it), and nltk's punkt_tab model, into decoding.nltk_data for the official
    post-processing (rule download_punkt_tab). None without those folders."""
    out, ev, dec, dl = [], config["evaluate"], config["decoding"], config["data"]["downloads"]
    for jar, j in (ev["spice_jars"] or {}).items() if ev["spice_jar_dir"] else ():
        name = "spice_" + re.sub(r"\W+", "_", jar.removesuffix(".jar"))
        out.append(_download(name, f"{ev['spice_jar_dir']}/{jar}", "file", j["url"], j["sha256"], sha1_url=j["sha1_url"]))
    if dec["nltk_data"] and dec["postprocess"] == "official":
        p = dl["punkt_tab"]
        out.append(_download("punkt_tab", punkt_tab_dir(config), "zip", p["url"], p["sha256"], folder=True,
                             archive=f"{dl['archive_dir']}/punkt_tab.zip", keep_archive=dl["keep_archives"]))
    return out


def punkt_tab_dir(config: dict) -> str:
    """Where nltk finds the punkt_tab model under decoding.nltk_data (its data layout)."""
    return f"{config['decoding']['nltk_data']}/tokenizers/punkt_tab"


def tool_inputs(config: dict, tool: str) -> list[str]:
    """The downloaded files a job running `tool` (spice | punkt_tab) reads: its rule's input."""
    return [d["out"] for d in tool_downloads(config) if d["name"].startswith(tool)]


def _download(name: str, out: str, kind: str, url: str, sha256: str | None, folder: bool = False, **options) -> dict:
    return {"name": name, "out": out, "folder": folder, "kind": kind, "url": url, "sha256": sha256, "options": options}


def report_spec(config: dict) -> dict:
    return {"report": config["report"], "runs": runs(config), "ablations": ablation_runs(config),
            "scst_rewards": config["scst"]["rewards"], "dico": config["dico"]}
