"""Captioning image files (`dico caption`): any images, with a captioner checkpoint of the pipeline or the
released DiCO, and no split file or feature cache.

The checkpoint names the backbone whose grid features it reads; its weights and the feature settings
(storage dtype, the backbone's precision, JPEG decoding) come from the config's `clip_models` and
`features`, and each batch goes through the code of `cache_features` (`dico.features.image_loader`,
`dico.features.grid_batch`) and of `generate` (`dico.inference.caption_batch`, the same
post-processing), so a captioner's text for an image is the text `dico generate` writes from the
cached features. The output is what `dico score` reads: a COCO results list named by file name, or
pacscore's {image name: caption}.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import config as C
from .checkpoint import captioner_from_payload, load_captioner
from .features import grid_batch, image_loader
from .images import IMAGE_EXTENSIONS, image_files
from .inference import caption_batch
from .io import InputError, Outputs
from .text import postprocess

FORMATS = ("coco", "pacscore")
BROKEN_HINT = "replace or remove the file, or pass --skip-broken-images to leave such images out"


def find_images(paths) -> list[Path]:
    """The image files of the PATH arguments: a file as given, a folder searched at any depth
    (`dico.images.image_files`); each file once, in the order given."""
    files, seen = [], set()
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise InputError(f"PATH {path}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder or "
                                 "below it; give a folder that holds images, or the image files")
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InputError(f"PATH {path}: not an image file (the extension is not one of "
                                 f"{' '.join(IMAGE_EXTENSIONS)}); give image files or folders of them")
            found = [path]
        else:
            raise InputError(f"PATH {path}: no such file or folder; check the path")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    return files


def image_names(files: list[Path], fmt: str) -> list[str]:
    """What the output calls each image: its file name (coco: `image_id`) or, as pacscore's files
    name images, its name without the extension (pacscore); two images may not share one."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    first: dict[str, Path] = {}
    for f in files:
        name = f.name if fmt == "coco" else f.stem
        if name in first:
            raise InputError(f"PATH: {first[name]} and {f} would both be named {name!r} in the captions file "
                             f"(--format {fmt}); caption them in separate runs, or rename one")
        first[name] = f
    return [f.name if fmt == "coco" else f.stem for f in files]


def load_model(model=None, official=None, *, backbone: str = "clip_l14", sha256: str | None = None,
               trust_pickle: bool = False, device: str = "cpu"):
    """(captioner, tokenizer, payload) of a checkpoint the pipeline wrote (`model`) or of the released
    DiCO (`official`: its zip, folder or weights file), converted in memory as `dico convert-official`
    converts it (reading the features of `backbone`)."""
    if official is not None:
        from .official import official_payload

        return captioner_from_payload(official_payload(official, backbone, sha256=sha256,
                                                       trust_pickle=trust_pickle), device)
    fix = ("give a captioner checkpoint the pipeline writes (results/runs/<run>/model.pt), or the released "
           "DiCO with --official")
    try:
        return load_captioner(model, device)
    except FileNotFoundError:
        raise InputError(f"--model {model}: no such file; {fix}") from None
    except ValueError as e:
        raise InputError(f"--model {e}; {fix}") from None


def decoding_settings(payload: dict, config: dict, beam: int | None = None, max_len: int | None = None,
                      batch: int | None = None) -> tuple[dict, str]:
    """(decoding, amp): the `decoding` section and `train.amp` of the checkpoint's run (its spec), or of
    `config` for what the checkpoint does not record (the released DiCO: as `generate` captions run
    dico_official; decoding.nltk_data, a place on this machine, always from `config`); `beam`,
    `max_len`, `batch` override them."""
    spec = payload.get("spec") or {}
    decoding = {**config["decoding"], **(spec.get("decoding") or {})}
    if "nltk_data" in config["decoding"]:  # where this machine keeps nltk's data, not a setting of the run
        decoding["nltk_data"] = config["decoding"]["nltk_data"]
    amp = (spec.get("train") or {}).get("amp", config["train"]["amp"])
    for key, value in (("beam_size", beam), ("max_len", max_len), ("batch_size", batch)):
        if value is not None:
            decoding[key] = value
    return decoding, amp


def backbone_spec(payload: dict, config: dict, label: str, config_path, checkpoint=None) -> dict:
    """The clip_models entry of the backbone the captioner reads (its weights: `checkpoint`, else the
    entry's path), checked to exist."""
    name = payload["backbone"]["name"]
    if name not in config["clip_models"]:
        raise InputError(f"{label} reads grid features of backbone {name!r}, but {config_path} has no clip_models "
                         f"entry {name!r} (has: {', '.join(config['clip_models'])}); pass the --config of the run "
                         "that trained it (the released DiCO: config/paper.yaml, backbone clip_l14)")
    spec = C.clip_model_spec(config, name)
    spec["path"] = str(checkpoint or spec["path"])
    if not Path(spec["path"]).is_file():
        raise InputError(f"backbone weights {spec['path']} (clip_models.{name} of {config_path}) not found: fetch "
                         "or train them with the pipeline (snakemake downloads / trains them first), or pass "
                         "--backbone-checkpoint PATH")
    return spec


def load_backbone(spec: dict, device: str):
    from .clip_weights import load_evaluator

    return load_evaluator(spec["path"], format=spec.get("format", "openai"), arch=spec.get("arch"), device=device)


@torch.no_grad()
def caption_files(model, tok, payload: dict, evaluator, files: list[Path], *, features: dict, decoding: dict,
                  amp: str, device: str, skip_broken: bool = False, label: str = "the captioner",
                  progress: bool = True) -> tuple[list[str | None], list[str]]:
    """(caption of each file, None for one left out; why each left-out file could not be read).

    `features`: the config's `features` (dtype, amp, jpeg_draft, num_workers); `decoding`, `amp`:
    `decoding_settings`. Batches of decoding.batch_size images go through the backbone and the beam
    search."""
    from tqdm import tqdm

    size = decoding["batch_size"]
    batches = [list(range(lo, min(lo + size, len(files)))) for lo in range(0, len(files), size)]
    # features.num_workers decoding processes, but no more than there are cores or batches to decode
    workers = min(features["num_workers"], os.cpu_count() or 1, len(batches))
    loader = image_loader(evaluator, files, batches, num_workers=workers, jpeg_draft=features["jpeg_draft"],
                          device=device, hint=BROKEN_HINT)
    captions: list[str | None] = [None] * len(files)
    broken: list[str] = []
    with tqdm(total=len(files), desc="caption", unit="img", disable=not progress, mininterval=1.0) as bar:
        for pixels, ok, idx, errors in loader:
            if not (skip_broken or ok.all()):
                raise InputError(str(next(e for e in errors if e is not None)))
            broken += [str(e) for e in errors if e is not None]
            feats = grid_batch(evaluator, pixels, ok, dtype=features["dtype"], amp=features["amp"], device=device)
            _check_grid(payload, feats, label)
            if ok.any():
                caps = caption_batch(model, tok, feats[ok].float(), decoding, amp, device)
                text = postprocess(caps, decoding["postprocess"], decoding.get("nltk_data"))
                for i, c in zip(idx[ok].tolist(), text):
                    captions[i] = c
            bar.update(len(idx))
    if broken and len(broken) == len(files):
        raise InputError(f"none of the {len(files)} images could be read (first: {broken[0]})")
    return captions, broken


def _check_grid(payload: dict, feats: torch.Tensor, label: str) -> None:
    want = payload["backbone"]
    if (want["tokens"], want["dim"]) != tuple(feats.shape[1:]):
        raise InputError(f"{label} reads {want['tokens']} x {want['dim']} grid features of backbone {want['name']!r}, "
                         f"but the backbone weights given give {feats.shape[1]} x {feats.shape[2]}; give the weights "
                         f"of that backbone (--backbone-checkpoint, or clip_models.{want['name']} of --config)")


def write_captions(out, names: list[str], captions: list[str | None], fmt: str) -> int:
    """Write the captions of the images that have one (COCO results list or pacscore's {name: caption}),
    whole or not at all; returns how many."""
    rows = [(n, c) for n, c in zip(names, captions) if c is not None]
    data = [{"image_id": n, "caption": c} for n, c in rows] if fmt == "coco" else dict(rows)
    with Outputs() as o:
        o.write_json(out, data)
    return len(rows)


def caption_table(names: list[str], captions: list[str | None], limit: int = 10) -> str:
    """The first `limit` captions, one per line under their image's name."""
    rows = [(n, c) for n, c in zip(names, captions) if c is not None]
    width = min(40, max([len("image")] + [len(n) for n, _ in rows[:limit]]))
    lines = [f"{'image':<{width}}  caption"] + [f"{n:<{width}}  {c}" for n, c in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return "\n".join(lines)
