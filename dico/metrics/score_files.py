"""`dico score`: the paper's metrics for anyone's captions, with no config file.

    dico score --captions FILE --refs FILE [--split test] [--images DIR] [--metrics bleu,...]
               [--clip PATH|ARCH:PRETRAINED] [--pac PATH] [--out m.json] [--per-caption scores.csv]

Inputs are read in the layouts people already have (`dico.metrics.inputs`). Metrics: BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D and SPICE through pycocoevalcap (Java only; SPICE also needs its CoreNLP
jars), CLIP-S / RefCLIP-S with --clip and PAC-S / RefPAC-S with --pac, with the official definitions
and the schema defaults of evaluate.clip_s / evaluate.pac_s (w = 2.5 and 2.0, prefix
"A photo depicts "). A metric that cannot run is null, with its reason. Never 0.
Human correlation (--correlation) is `dico.metrics.correlation`.
"""
from __future__ import annotations

import csv
import io
import time

from ..clip_weights import load_scorer
from ..embeddings import embed_images
from ..io import InputError, Outputs, provenance, sha256_file
from .inputs import load_inputs
from .keys import EXTRA_KEYS, KEYS, METRICS, TABLE_KEYS
from .scoring import compute

# an image that will not decode under --images: what the user can do about it
BROKEN_IMAGE_HINT = ("replace the file, remove its entry from the candidates, or pass --skip-broken-images to "
                     "leave such images out of every metric")


def clip_settings() -> dict:
    """CLIP-S and PAC-S settings: the schema defaults of evaluate.clip_s / evaluate.pac_s (the papers')."""
    from ..config import schema

    props = schema()["properties"]["evaluate"]["properties"]
    return {"clip-s": dict(props["clip_s"]["default"]), "pac-s": dict(props["pac_s"]["default"])}


def parse_metrics(text: str | None) -> list[str] | None:
    """--metrics a,b,c -> the names (None = every metric that can run)."""
    if text is None or text.strip() in ("", "all"):
        return None
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise InputError(f"--metrics: unknown {', '.join(map(repr, unknown))}; choose from {','.join(METRICS)}")
    return list(dict.fromkeys(names))



# what a CLIP metric needs, by the flag that gives it
CLIP_FLAGS = {"clip-s": ("--clip", "OpenAI CLIP ViT-B/32 (ViT-B-32.pt) or ARCH:PRETRAINED"),
              "pac-s": ("--pac", "the PAC-S checkpoint clip_ViT-B-32.pth")}


def load_scorers(clip: str | None, pac: str | None, wanted: list[str] | None, device: str,
                 clip_arch: str | None = None, pac_arch: str | None = None) -> dict:
    """'clip-s' / 'pac-s' -> Evaluator, or the reason why there is none."""
    chosen = list(METRICS) if wanted is None else wanted
    out = {}
    for name, spec, arch in (("clip-s", clip, clip_arch), ("pac-s", pac, pac_arch)):
        if name not in chosen and "ref" + name not in chosen:
            continue
        flag, what = CLIP_FLAGS[name]
        out[name] = load_scorer(spec, arch, flag, device) if spec else f"needs {flag} PATH ({what})"
    return out


def refuse_what_cannot_run(wanted: list[str] | None, images, clip, pac, spice_jar_dir) -> None:
    """A metric asked for by name (--metrics) that cannot run is an error before any work, naming the
    flag that is missing; the default (every metric) only reports the ones that cannot run."""
    import shutil

    from .coco import find_spice_jars
    from .spice import FETCH_HINT

    for m in wanted or []:
        family = m.removeprefix("ref")
        if family in CLIP_FLAGS:
            flag, what = CLIP_FLAGS[family]
            if not (clip if family == "clip-s" else pac):
                raise InputError(f"--metrics {m} needs {flag} PATH ({what})")
            if images is None:
                raise InputError(f"--metrics {m} needs --images DIR (the folder of the images the captions describe)")
        elif shutil.which("java") is None:
            raise InputError(f"--metrics {m} needs Java on PATH (the PTB tokenizer is Java): install a JRE "
                             "(apt-get install default-jre-headless)")
        elif m == "spice" and find_spice_jars(spice_jar_dir) is None:
            raise InputError("--metrics spice needs the Stanford CoreNLP 3.6.0 jars: give their folder as "
                             f"--spice-jar-dir; {FETCH_HINT} (then --spice-jar-dir resources/spice)")


def clip_scorers(scorers: dict, images: list | None, device: str, batch_size: int, workers: int,
                 skip_broken: bool = False) -> tuple[dict, set]:
    """compute()'s `clip` argument: per CLIP metric, (model, embeddings of `images` in entry order,
    settings), each distinct image embedded once; or the reason it cannot run. And the images that
    could not be read (with `skip_broken`: their rows are NaN)."""
    import torch

    from ..embeddings import skipped_rows

    settings, out, broken = clip_settings(), {}, set()
    for name, model in scorers.items():
        if images is None or isinstance(model, str):
            out[name] = "no images: pass --images DIR" if images is None else model
            continue
        unique = list(dict.fromkeys(images))
        row = {p: n for n, p in enumerate(unique)}
        embs = embed_images(model, unique, batch_size=batch_size, device=device, workers=workers,
                            skip_broken=skip_broken, broken_hint=BROKEN_IMAGE_HINT, progress=False)
        broken |= {unique[i] for i in skipped_rows(embs)}
        out[name] = (model, embs[torch.tensor([row[p] for p in images], dtype=torch.long)], settings[name])
    return out, broken


def caption_warnings(captions: list[str], clip_in: dict) -> dict:
    """What `dico score` counts and reports instead of failing: empty captions (scored as they are:
    0 on the n-gram metrics) and captions longer than a CLIP scorer's context (it reads their start)."""
    from ..tokenizer import clip_encode

    out = {"empty_captions": sum(not c.strip() for c in captions)}
    for name, scorer in clip_in.items():
        if not isinstance(scorer, str):
            model, _, settings = scorer
            n = sum(len(clip_encode(settings["prefix"] + c)) + 2 > model.context_length for c in captions)
            out[f"truncated_captions_{name}"] = n
    return out


def score_files(captions, refs, *, split=None, images=None, metrics=None, clip=None, pac=None,
                clip_arch=None, pac_arch=None, spice_jar_dir=None, device="cpu", batch_size=64,
                workers=0, skip_broken=False, log=None) -> dict:
    """Everything `dico score` writes to --out (see the module docstring). `skip_broken`: an image that
    cannot be read is left out of every metric (counted and listed) instead of stopping the run."""
    t0 = time.time()
    wanted = parse_metrics(metrics) if isinstance(metrics, str) or metrics is None else list(metrics)
    refuse_what_cannot_run(wanted, images, clip, pac, spice_jar_dir)
    entries, summary = load_inputs(captions, refs, split, images)
    scorers = load_scorers(clip, pac, wanted, device, clip_arch, pac_arch)
    clip_in, broken = clip_scorers(scorers, [e.image for e in entries] if images else None, device, batch_size,
                                   workers, skip_broken)
    keep = [n for n, e in enumerate(entries) if e.image not in broken]
    if broken:  # every metric describes the same images
        clip_in = {k: v if isinstance(v, str) else (v[0], v[1][keep], v[2]) for k, v in clip_in.items()}
    skipped, entries = [e.id for e in entries if e.image in broken], [entries[n] for n in keep]
    if not entries:
        raise InputError(f"--images {images}: none of the images could be read: nothing to score")
    corpus, per, reasons = compute([e.caption for e in entries], [e.refs for e in entries], wanted, clip_in,
                                   spice_jar_dir)
    warnings = caption_warnings([e.caption for e in entries], clip_in)
    if any(warnings.values()) and log:
        log(f"warnings: {warnings} (counted in the output's 'warnings')")
    settings = {"metrics": wanted or "all", "clip": clip, "pac": pac, "clip_arch": clip_arch,
                "pac_arch": pac_arch, **{k.replace("-", "_"): v for k, v in clip_settings().items()},
                "spice_jar_dir": spice_jar_dir}
    inputs = {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in (("captions", captions), ("refs", refs))}
    return {"tool": "dico score", **summary,
            "metrics": {k: corpus.get(k) for k in TABLE_KEYS},
            "extra": {k: corpus[k] for k in EXTRA_KEYS if k in corpus},
            "reasons": {**{k: v for k, v in reasons.items() if k in KEYS}, **(
                {"skipped_images": f"{len(skipped)} unreadable images left out of every metric "
                                   "(--skip-broken-images)"} if skipped else {})},
            "warnings": warnings, "skipped_images": skipped, "n_scored": len(entries),
            "per_caption": {"ids": [e.id for e in entries], "captions": [e.caption for e in entries], **per},
            "provenance": provenance(settings, seed=None, device=device, wall_time_s=time.time() - t0,
                                     inputs=inputs)}


# ----------------------------------------------------------------------------------------------
# outputs

def format_table(metrics: dict, reasons: dict, keys=TABLE_KEYS) -> str:
    """The metrics in the order of the paper's tables: raw value, x100 (as papers print), or the reason."""
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  {'value':>8}  {'x100':>6}"]
    for k in keys:
        v = metrics.get(k)
        if v is None:
            lines.append(f"{k:<{width}}  {'--':>8}  {'--':>6}  {reasons.get(k, 'not computed')}")
        else:
            lines.append(f"{k:<{width}}  {v:>8.4f}  {100 * v:>6.1f}")
    return "\n".join(lines)


def per_caption_csv(result: dict) -> str:
    """One row per image: its id, the candidate, and every metric that has a per-image value."""
    per = result["per_caption"]
    cols = [k for k in ("rating", *KEYS) if k in per]  # rating: --correlation's human judgement
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "caption", *cols] if "rating" in per else ["image_id", "caption", *cols])
    for n, (i, c) in enumerate(zip(per["ids"], per["captions"])):
        w.writerow([i, c, *(repr(float(per[k][n])) for k in cols)])
    return buf.getvalue()


def write_outputs(result: dict, out=None, per_caption=None) -> None:
    """--out and --per-caption: both or neither (dico.io.Outputs)."""
    with Outputs() as files:
        if out:
            files.write_json(out, {k: v for k, v in result.items() if k != "per_caption"})
        if per_caption:
            files.write_text(per_caption, per_caption_csv(result))
