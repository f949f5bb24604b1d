"""Where the pipeline writes everything (`results/`), in one place.

The Snakefile's rules (workflow/rules/*.smk) and `dico.config` take every path from here, so the
results layout is changed in one place. A name given as "{run}" (a Snakemake wildcard) stays a
wildcard in the pattern: `captions_file("{run}", "test")` is "results/captions/{run}/test.json".

    results/data/splits.json                   the normalised split file (train / val / test)
    results/data/demo/                         the demo's images and Karpathy file
    results/data/ood/<set>/splits.json         an extra evaluation set's split file
    results/clip_models/<name>.pt, .json       the demo's CLIP stand-ins and their retrieval figures
    results/features/<backbone>/<split>/       grid features (index.json + shards)
    results/embeddings/<model>/<split>.pt      image embeddings of a scorer or reward model
    results/runs/<run>/model.pt, train_log.jsonl, work/   a training run
    results/runs/<run>/tensorboard/            its TensorBoard curves (dico.run_events; not an output)
    results/captions/<run>/<split>.json        generated captions (COCO results format)
    results/metrics/<run>/<split>.json         every metric of a run on a split
    results/tables/, results/figures/          what goes into the paper
    results/logs/                              one log per job

A split of an extra evaluation set is named "ood/<set>" here (`ood_split`): its features, embeddings,
captions and metrics sit under .../ood/<set>.
"""
RESULTS = "results"


def demo_dir() -> str:
    return f"{RESULTS}/data/demo"


def demo_karpathy() -> str:
    return f"{demo_dir()}/dataset_demo.json"


def demo_images() -> str:
    return f"{demo_dir()}/images"


def splits_file() -> str:
    return f"{RESULTS}/data/splits.json"


def ood_split(name: str) -> str:
    """The split name of extra evaluation set `name` in the paths below."""
    return f"ood/{name}"


def eval_set_splits(name: str) -> str:
    return f"{RESULTS}/data/ood/{name}/splits.json"


def split_source(split: str) -> tuple[str, str]:
    """(split file, the split's name inside it): COCO's train / val / test are in the split file, an
    extra evaluation set's "ood/<set>" is split <set> of the set's own file."""
    if split.startswith("ood/"):
        return eval_set_splits(split[len("ood/"):]), split[len("ood/"):]
    return splits_file(), split


def clip_model(name: str) -> str:
    return f"{RESULTS}/clip_models/{name}.pt"


def clip_stats(name: str) -> str:
    return f"{RESULTS}/clip_models/{name}.json"


def features_index(backbone: str, split: str) -> str:
    return f"{RESULTS}/features/{backbone}/{split}/index.json"


def feature_part(backbone: str, split: str, part, parts) -> str:
    return f"{RESULTS}/features/{backbone}/{split}/part-{part}-of-{parts}.json"


def embeddings_file(model: str, split: str) -> str:
    return f"{RESULTS}/embeddings/{model}/{split}.pt"


def run_model(run: str) -> str:
    return f"{RESULTS}/runs/{run}/model.pt"


def train_log(run: str) -> str:
    return f"{RESULTS}/runs/{run}/train_log.jsonl"


def captions_file(run: str, split: str) -> str:
    return f"{RESULTS}/captions/{run}/{split}.json"


def metrics_file(run: str, split: str) -> str:
    return f"{RESULTS}/metrics/{run}/{split}.json"


def table(name: str, ext: str = "tex") -> str:
    return f"{RESULTS}/tables/{name}.{ext}"


def figure(name: str, ext: str = "pdf") -> str:
    return f"{RESULTS}/figures/{name}.{ext}"


def log(*parts: str) -> str:
    """results/logs/<parts...>.log"""
    return f"{RESULTS}/logs/" + "/".join(parts) + ".log"
