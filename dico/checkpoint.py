"""The captioner checkpoint: what a training run (or the converter of the released DiCO) writes, and
everything that reads it back (`dico generate`, fine-tuning's start model, `dico evaluate`'s provenance,
`dico export-official`).

A checkpoint is one torch file holding `{"format": "dico-captioner-v1", "model_config", "tokenizer",
"state_dict", "backbone": {"name", "dim", "tokens"} (the grid features it reads), "run", "step", "val",
"spec"}`: the model, how to decode its ids, what it was trained on and how.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .model import Captioner, CaptionerConfig
from .tokenizer import CaptionTokenizer

CHECKPOINT_FORMAT = "dico-captioner-v1"
ARCHITECTURE_KEYS = ("d_model", "enc_layers", "dec_layers", "n_heads", "d_ff")


def captioner_payload(model: Captioner, tok: CaptionTokenizer, backbone: dict, spec: dict, step: int | None,
                      val: dict | None) -> dict:
    """The checkpoint of `model`; `backbone` = {"name", "dim", "tokens"} of the features it reads
    (`dico.features.FeatureStore.grid`)."""
    return {"format": CHECKPOINT_FORMAT, "model_config": asdict(model.cfg), "tokenizer": tok.state_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "backbone": {"name": backbone["name"], "dim": backbone["dim"], "tokens": backbone["tokens"]},
            "run": spec["run"], "step": step, "val": val, "spec": spec}


def _read(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: captioner checkpoint not found") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable captioner checkpoint ({e}); was the job killed "
                         "while writing it? Delete it and rerun its training rule") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return payload


def load_captioner(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, payload) from a checkpoint written by a training run."""
    return captioner_from_payload(_read(Path(path)), device)


def captioner_from_payload(payload: dict, device: str = "cpu"):
    """(model in eval mode, tokenizer, payload) from a checkpoint's content (e.g. a release converted in
    memory, `dico.official.official_payload`)."""
    model = Captioner(CaptionerConfig(**payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), CaptionTokenizer.from_state_dict(payload["tokenizer"]), payload


def check_backbone(payload: dict, grid: dict, path) -> None:
    """A model trained on one backbone's features must not silently read another's (`grid`: the
    {"name", "dim", "tokens"} of the features given)."""
    want = payload["backbone"]
    if (want["dim"], want["tokens"], want["name"]) != (grid["dim"], grid["tokens"], grid["name"]):
        raise ValueError(
            f"{path} was trained on features of backbone {want['name']!r} ({want['tokens']}x{want['dim']}), "
            f"but the features given are from {grid['name']!r} ({grid['tokens']}x{grid['dim']}); "
            "use the features of the same features.backbone or retrain")


def check_architecture(payload: dict, spec: dict, path) -> None:
    """The checkpoint a run starts from must be the captioner the config describes."""
    have, want = payload["model_config"], spec["model"]
    diff = [f"model.{k} is {want[k]} in the config but {have[k]} in the checkpoint"
            for k in ARCHITECTURE_KEYS if have.get(k) != want.get(k)]
    if diff:
        raise ValueError(f"{path} does not match the config: {'; '.join(diff)}. Retrain XE with this config "
                         "(snakemake reruns train_xe when model.* changes) or restore the config")


def run_provenance(path: str | Path) -> dict:
    """The training run's spec, seed and XE/best step, read from its checkpoint (a metrics file's
    provenance)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    spec = payload.get("spec", {})
    return {"checkpoint": path, "run": payload.get("run"), "seed": spec.get("seed"),
            "deterministic": spec.get("deterministic"),
            "best_step": payload.get("step"), "val": payload.get("val"), "spec": spec}
