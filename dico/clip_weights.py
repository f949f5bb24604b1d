"""CLIP weights on disk: loading any accepted layout into an `Evaluator`, and saving one.

Accepted: OpenAI CLIP names as a TorchScript archive (OpenAI's ViT-B-32.pt), a state dict or
{'state_dict': ...} (the PAC-S checkpoint clip_ViT-B-32.pth, and the demo's stand-ins, saved in that
layout so that the demo exercises the real loader); open_clip names with an architecture name
(`format="open_clip"`); for `dico score`, also an open_clip ARCH:PRETRAINED already in the local
cache. Everything is built with `pretrained=None` or from the cache: nothing touches a model hub.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .clip_model import HEAD_WIDTH, Evaluator
from .io import InputError, torch_save

# keys a TorchScript archive carries that are not weights: OpenAI's JIT model stores its
# hyper-parameters as tensors, and a scripted open_clip model keeps its causal mask buffer
_JIT_META_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

_OPENAI_FORMAT = ("format='openai': OpenAI CLIP module names (visual.conv1.weight, visual.proj, "
                  "transformer.resblocks.N..., token_embedding.weight, text_projection), as a "
                  "TorchScript archive (OpenAI's ViT-B-32.pt), a state dict, or {'state_dict': ...} "
                  "(the PAC-S clip_ViT-B-32.pth)")


def _open_clip_format(arch) -> str:
    return (f"format='open_clip', arch={arch!r}: the state dict of open_clip.create_model({arch!r}), "
            "optionally under 'state_dict' and/or with 'module.' prefixes")



def load_evaluator(path, format: str = "openai", arch: str | None = None, device="cpu") -> Evaluator:
    """Load CLIP weights into a frozen fp32 Evaluator on `device` (see the module docstring)."""
    path = Path(path)
    if format == "openai":
        expected = _OPENAI_FORMAT
    elif format == "open_clip":
        if not arch:
            raise ValueError(f"load_evaluator({path}): format='open_clip' needs arch= (an open_clip "
                             "model config name such as 'ViT-L-14')")
        expected = _open_clip_format(arch)
    else:
        raise ValueError(f"load_evaluator({path}): unknown format {format!r}; use 'openai' or 'open_clip'")
    sd = _read_state_dict(path, expected)
    model = _build_openai(sd, path) if format == "openai" else _build_open_clip(sd, arch, path)
    return Evaluator(model.float(), name=f"{format}:{path.name}").to(device)


def _read_state_dict(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """Any of the accepted containers -> a flat {name: tensor} dict on CPU."""
    if not path.is_file():
        raise FileNotFoundError(f"evaluator checkpoint {path} does not exist; expected {expected}")
    unreadable = f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?); expected {expected}"
    try:
        if _is_torchscript(path):
            # OpenAI's released .pt files are TorchScript archives; only torch.jit.load reads them
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, KeyError, UnpicklingError, EOFError ...
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if glob:  # a real checkpoint that also pickles Python objects (e.g. an argparse Namespace)
            raise ValueError(f"{path} holds a Python object ({glob.group(1)}) besides tensors, which is not "
                             f"loaded (weights_only=True); re-save just the weights. Expected {expected}") from None
        raise ValueError(f"{unreadable} ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PAC-S and open_clip training checkpoints
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} does not hold a state dict (found {keys}); expected {expected}")
    # strip DataParallel / DDP prefixes
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _is_torchscript(path: Path) -> bool:
    # a TorchScript archive is a zip with <name>/constants.pkl and <name>/code/; torch.save's has neither
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def _build_openai(sd: dict, path: Path):
    """OpenAI-named weights -> open_clip CLIP (QuickGELU), architecture inferred from the shapes."""
    from open_clip.model import build_model_from_openai_state_dict

    sd = {k: v for k, v in sd.items() if k not in _JIT_META_KEYS}
    need = ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    need += ["visual.conv1.weight", "visual.positional_embedding"] if "visual.proj" in sd else \
        ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"]  # ViT or ResNet
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(_mismatch_msg(path, _OPENAI_FORMAT, missing, [], [], _suggest(sd, "openai")))
    try:
        # open_clip's builder infers the architecture from the shapes and lays the modules out. On the
        # meta device it skips their random initialisation and its fp16 copy of the weights (~1 s for
        # ViT-B/32, ~2.5 s for ViT-L/14, in every job that loads one); the weights are assigned below.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            model = build_model_from_openai_state_dict(dict(sd), cast_dtype=None)
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(_mismatch_msg(path, _OPENAI_FORMAT, *_parse_load_error(str(e)),
                                       _suggest(sd, "openai"))) from None
    model.float()  # OpenAI's JIT weights are fp16; PAC-S evaluates (and stores its checkpoint) in fp32
    mask = getattr(model, "attn_mask", None)
    if isinstance(mask, torch.Tensor) and mask.is_meta:  # not a weight: open_clip's causal mask, rebuilt
        model.attn_mask = torch.full(tuple(mask.shape), float("-inf")).triu_(1)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_evaluator({path}): {left[:5]} have no value after loading: this open_clip "
                           "version builds tensors that are not weights; report it with its version")
    return model


def _build_open_clip(sd: dict, arch: str, path: Path):
    """open_clip-named weights for the config `arch` -> open_clip model, strict load."""
    import open_clip

    expected = _open_clip_format(arch)
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"load_evaluator({path}): {arch!r} is not an open_clip model config (register "
                         "a custom one with open_clip.add_model_config); expected " + expected)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:  # random init, replaced below; silence open_clip's "initialized randomly" warning
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        root.setLevel(level)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(_mismatch_msg(path, expected, missing, unexpected, shapes, _suggest(sd, "open_clip")))
    model.load_state_dict(sd, strict=True)
    return model


def _parse_load_error(msg: str) -> tuple[list[str], list[str], list[str]]:
    """Missing / unexpected keys and shape mismatches out of torch's load_state_dict error text."""
    def keys(label):
        m = re.search(label + r' key\(s\) in state_dict: (.*)', msg)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []
    shapes = [f"{k}: {a} vs {b}" for k, a, b in re.findall(
        r"size mismatch for (\S+): copying a param with shape (.+?) from checkpoint, "
        r"the shape in current model is (.+?)\.", msg)]
    missing, unexpected = keys("Missing"), keys("Unexpected")
    if not (missing or unexpected or shapes):
        unexpected = [msg[:300]]
    return missing, unexpected, shapes


def _suggest(sd: dict, format: str) -> str:
    looks_openai = "visual.proj" in sd and any(k.startswith("transformer.resblocks.") for k in sd)
    looks_open_clip = any(k.startswith(("text.", "visual.trunk.", "visual.attn_pool")) for k in sd) or \
        any(".ls_1." in k or k == "logit_bias" for k in sd)
    if format == "openai" and looks_open_clip:
        return ("these look like open_clip names of a non-OpenAI architecture; load with "
                "format='open_clip' and arch=<its open_clip config name>")
    if format == "open_clip" and looks_openai:
        return ("these look like OpenAI CLIP names; if it is an OpenAI-architecture (QuickGELU) CLIP "
                "such as the PAC-S ViT-B/32, load with format='openai', which infers the architecture "
                "from the shapes; otherwise check arch")
    return ""


def _mismatch_msg(path, expected, missing, unexpected, shapes, hint) -> str:
    def few(xs):
        return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
    parts = [f"{path}: the weights do not match {expected}."]
    if missing:
        parts.append(f"Missing keys: {few(missing)}.")
    if unexpected:
        parts.append(f"Unexpected keys: {few(unexpected)}.")
    if shapes:
        parts.append(f"Shape mismatches (checkpoint vs model): {few(shapes)}.")
    if hint:
        parts.append(hint[0].upper() + hint[1:] + ".")
    return " ".join(parts)


_BLOCK = r"transformer\.resblocks\.\d+\.(attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)" \
         r"|ln_[12]\.(weight|bias)|mlp\.(c_fc|c_proj)\.(weight|bias))"
_OPENAI_KEY = re.compile(
    r"(positional_embedding|text_projection|logit_scale|token_embedding\.weight|ln_final\.(weight|bias)"
    r"|visual\.(class_embedding|positional_embedding|proj|conv1\.weight|ln_(pre|post)\.(weight|bias))"
    rf"|{_BLOCK}|visual\.{_BLOCK})")


def openai_compat_problems(model) -> list[str]:
    """Why `model` would not survive save_evaluator -> load_evaluator(format='openai') unchanged:
    the loader rebuilds the OpenAI architecture from shapes (heads = width // 64, MLP ratio 4,
    QuickGELU, class-token ViT), so anything else would load into a different network."""
    from open_clip.transformer import QuickGELU

    problems = [f"key {k!r} is not an OpenAI CLIP weight" for k in model.state_dict()
                if not _OPENAI_KEY.fullmatch(k)][:5]
    towers = [("text", getattr(model, "transformer", None))]
    towers.append(("vision", getattr(getattr(model, "visual", None), "transformer", None)))
    for name, tower in towers:
        if tower is None or not hasattr(tower, "resblocks"):
            problems.append(f"no OpenAI-style {name} transformer")
            continue
        block, width = tower.resblocks[0], tower.width
        if width % HEAD_WIDTH or block.attn.num_heads != width // HEAD_WIDTH:
            problems.append(f"{name} width {width} with {block.attn.num_heads} heads; OpenAI CLIP "
                            f"needs width a multiple of {HEAD_WIDTH} and heads = width // {HEAD_WIDTH}")
        if block.mlp.c_fc.out_features != 4 * width:
            problems.append(f"{name} MLP ratio is not 4")
        if not isinstance(block.mlp.gelu, QuickGELU):
            problems.append(f"{name} activation is {type(block.mlp.gelu).__name__}, not QuickGELU")
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        problems.append("text pooling is not argmax (EOT position)")
    return problems


def save_evaluator(evaluator_or_model, path) -> None:
    """Write {'state_dict': OpenAI-named fp32 weights} (the PAC-S checkpoint layout), atomically."""
    model = getattr(evaluator_or_model, "model", evaluator_or_model)
    problems = openai_compat_problems(model)
    if problems:
        raise ValueError(f"cannot save {type(model).__name__} to {path} in the OpenAI CLIP layout: "
                         + "; ".join(problems))
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    torch_save({"state_dict": sd}, path)



# -- dico score: a checkpoint file or an open_clip model in the local cache ------------------------
def load_scorer(spec: str, arch: str | None, flag: str, device: str):
    """--clip / --pac: a checkpoint file (OpenAI layout, or open_clip layout with --*-arch), or an
    open_clip ARCH:PRETRAINED whose weights are already in the local cache."""
    path = Path(spec)
    if path.is_file():
        _refuse_lora(path, flag)
        return load_evaluator(path, format="open_clip" if arch else "openai", arch=arch, device=device)
    if ":" in spec and not path.exists():
        return _open_clip_cached(*spec.split(":", 1), flag=flag, device=device)
    raise InputError(f"{flag} {spec}: no such file. Give a checkpoint path (OpenAI's ViT-B-32.pt, the PAC-S "
                     "clip_ViT-B-32.pth) or an open_clip ARCH:PRETRAINED (e.g. ViT-B-32:openai) whose weights "
                     "are in the local cache")


def _refuse_lora(path: Path, flag: str) -> None:
    """PAC-S++ checkpoints (PAC++_clip_*.pth) hold LoRA adapters (lora_A / lora_B) inside a custom
    CLIP; that network is not rebuilt here, so say so instead of failing on missing keys."""
    try:
        obj = torch.load(path, map_location="meta", weights_only=True)
    except Exception:
        return  # TorchScript or unreadable: load_evaluator gives the precise message
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    if isinstance(sd, dict) and any("lora_" in str(k) for k in sd):
        raise InputError(f"{flag} {path}: a PAC-S++ checkpoint (LoRA adapters), which dico score does not support; "
                         "use the PAC-S checkpoint clip_ViT-B-32.pth, or pacscore's compute_correlations_pac++.py")


def _cached_open_clip_file(arch: str, tag: str) -> str | None:
    """Where open_clip would load ARCH:TAG from, if that file is already in the local cache (no network)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:  # 'org/model/' (default file name) or 'org/model/file.bin'; safetensors twins are tried first
        from huggingface_hub import try_to_load_from_cache

        repo, name = os.path.split(hub)
        name = name or HF_WEIGHTS_NAME
        twins = [HF_SAFE_WEIGHTS_NAME] if name == HF_WEIGHTS_NAME else (
            [name[:-4] + ".safetensors"] if name.endswith((".bin", ".pth")) else [])
        for n in twins + [name]:
            hit = try_to_load_from_cache(repo, n)
            if isinstance(hit, str):
                return hit
    if cfg.get("url"):
        p = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if p.is_file():
            return str(p)
    return None


def _open_clip_cached(arch: str, tag: str, flag: str, device: str):
    import open_clip

    if open_clip.get_model_config(arch) is None:
        raise InputError(f"{flag} {arch}:{tag}: {arch!r} is not an open_clip model (e.g. ViT-B-32, ViT-L-14)")
    if tag not in open_clip.list_pretrained_tags_by_model(arch):
        raise InputError(f"{flag} {arch}:{tag}: open_clip has no weights {tag!r} for {arch} (it has: "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})")
    if open_clip.get_model_config(arch).get("text_cfg", {}).get("hf_tokenizer_name"):
        raise InputError(f"{flag} {arch}:{tag}: its text tower uses a Hugging Face tokenizer, not CLIP's BPE, "
                         "which the CLIP-S/PAC-S definitions assume; pick a CLIP-BPE model")
    if _cached_open_clip_file(arch, tag) is None:
        raise InputError(f"{flag} {arch}:{tag}: the weights are not in the local cache, and dico score downloads "
                         "nothing. Fetch them once on a machine with internet (python -c \"import open_clip; "
                         f"open_clip.create_model('{arch}', pretrained='{tag}')\") and copy the Hugging Face "
                         "cache over, or pass a checkpoint file")
    model = open_clip.create_model(arch, pretrained=tag)
    return Evaluator(model.float(), name=f"open_clip:{arch}:{tag}").to(device)

