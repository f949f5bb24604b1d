"""The released DiCO checkpoint (aimagelab/DiCO, "dico-ViTL14") as one of our captioner checkpoints.

    dico convert-official --src resources/weights/dico-ViTL14.zip --out results/runs/dico_official/model.pt

The release is an HF `save_pretrained` folder of the official VisionEncoderDecoderModel
(config.json + pytorch_model.bin or model.safetensors, loaded in demo.py by AutoModel.from_pretrained
after register_models()). Shared on Google Drive as one file, so we ASSUME a zip of that folder; the
converter sniffs what it gets instead of trusting the name: a folder, a zip or tar of it (the folder
may be nested), or a bare weights file (.bin / .safetensors / DeepSpeed mp_rank_*_model_states.pt,
with config.json beside it or, without one, sizes read off the tensor shapes and 8 heads).

Names map per the table in dico/model.py's docstring. GPT-2's Conv1D weights are [in, out] and are
transposed; BERT's token-type table contributes its row 0 (the only type the encoder is fed). Keys
we do not use are named in IGNORED and dropped; any other key, a missing one or a shape that does
not fit is an error naming it, since it would mean a different architecture.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

log = logging.getLogger("dico")

RUN = "dico_official"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
IGNORED = [  # (pattern, why it is not needed)
    (r"encoder\.vision_encoder\..*", "frozen CLIP ViT-L/14 tower: our features come from the same OpenAI weights"),
    (r"encoder\.encoder\.embeddings\.word_embeddings\.weight", "BERT word table: the encoder is fed features"),
    (r"encoder\.encoder\.embeddings\.(position_ids|token_type_ids)", "index buffers"),
    (r"encoder\.encoder\.pooler\..*", "BERT pooler: unused"),
    (r"decoder\.transformer\.h\.\d+\.(attn|crossattention)\.(bias|masked_bias)", "GPT-2 causal-mask buffers"),
    (r"decoder\.lm_head\.weight", "tied to decoder.transformer.wte (checked equal)"),
]


# -- reading the release ---------------------------------------------------------------------------
def _find(root: Path, names) -> Path | None:
    """The shallowest file under `root` named like one of `names` (in that order of preference)."""
    for name in names:
        hits = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p)))
        if hits:
            return hits[0]
    return None


def _unpack(archive: Path, tmp: Path) -> Path:
    """Extract only config.json and the weights of an archived HF folder into `tmp`."""
    wanted = lambda name: Path(name).name in ("config.json", *WEIGHT_FILES) or name.endswith(".safetensors") \
        or re.search(r"pytorch_model-\d+-of-\d+\.bin$", name)  # noqa: E731 (shards of an index)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if wanted(info.filename) and ".." not in Path(info.filename).parts:
                    zf.extract(info, tmp)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, members=[m for m in tf.getmembers() if m.isfile() and wanted(m.name)],
                          filter="data")
    return tmp


def _is_archive(path: Path) -> bool:
    """A zip or tar of a folder; torch.save files are zips too, told apart by their data.pkl."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return not any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
    return tarfile.is_tarfile(path)


def _load_tensors(path: Path) -> dict:
    import torch

    if path.name.endswith(".index.json"):  # sharded save_pretrained
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(_load_tensors(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("reading .safetensors needs the safetensors package (installed with "
                              "open_clip_torch)") from None
        return load_file(str(path))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # DeepSpeed model-state files also pickle non-tensor objects
        log.warning("%s is not a plain state dict; loading it with weights_only=False (trusted file)", path)
        blob = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("module", "state_dict", "model"):  # DeepSpeed / Lightning-style wrappers
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    return {k.removeprefix("module."): v for k, v in blob.items()}


def load_release(src: str | Path) -> tuple[dict, dict | None]:
    """(state dict, parsed config.json or None) of the release at `src` (folder, archive or file)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: the official DiCO checkpoint is not there (download it with "
                                f"`snakemake download_official` or by hand from the DiCO README's Drive link)")
    if src.is_file() and _is_archive(src):
        near = src.parent if os.access(src.parent, os.W_OK) else None  # /tmp may be too small for 1.5 GB
        with tempfile.TemporaryDirectory(prefix=".official-", dir=near) as tmp:
            return load_release(_unpack(src, Path(tmp)))
    if src.is_dir():
        weights, config = _find(src, WEIGHT_FILES), _find(src, ["config.json"])
        if weights is None:
            raise FileNotFoundError(f"{src}: no {' / '.join(WEIGHT_FILES)} inside")
    else:
        weights, config = src, src.with_name("config.json")
    hf_config = json.loads(config.read_text()) if config is not None and config.exists() else None
    log.info("official checkpoint: weights %s, config %s", weights, config if hf_config else "none")
    return _load_tensors(weights), hf_config


# -- sizes ------------------------------------------------------------------------------------------
def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"official checkpoint: {what}; this converter maps the DiCO architecture only")


def _n_layers(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def captioner_config(sd: dict, hf: dict | None):
    """CaptionerConfig of the release (from config.json, checked; else read off the shapes) and the
    number of visual tokens its backbone gives."""
    from .model import CaptionerConfig
    from .tokenizer import CLIP_BOS, CLIP_EOS, CLIP_PAD

    wte = sd["decoder.transformer.wte.weight"]
    bridge = sd["encoder.vis_enc_to_enc_proj.weight"]
    if hf is None:  # a bare weights file: everything but the head count is in the shapes
        log.warning("no config.json: sizes read off the tensors, 8 heads and 257 visual tokens assumed (ViT-L/14)")
        cfg = CaptionerConfig(
            feat_dim=bridge.shape[1], vocab_size=wte.shape[0], pad_id=CLIP_PAD, bos_id=CLIP_BOS, eos_id=CLIP_EOS,
            d_model=wte.shape[1], enc_layers=_n_layers(sd, "encoder.encoder.encoder.layer."),
            dec_layers=_n_layers(sd, "decoder.transformer.h."), n_heads=8,
            d_ff=sd["decoder.transformer.h.0.mlp.c_fc.weight"].shape[1],
            max_enc_positions=sd["encoder.encoder.embeddings.position_embeddings.weight"].shape[0],
            max_dec_positions=sd["decoder.transformer.wpe.weight"].shape[0])
        return cfg, 257
    enc = hf.get("encoder", {})
    bert, vis, gpt = enc.get("encoder", {}), enc.get("vision_encoder", {}), hf.get("decoder", {})
    _require(bool(bert and gpt and vis), "config.json lacks encoder.encoder / encoder.vision_encoder / decoder")
    d = gpt["n_embd"]
    d_ff = gpt.get("n_inner") or 4 * d
    for key, value, want in [
        ("encoder.encoder.hidden_size", bert.get("hidden_size"), d),  # else an enc_to_dec_proj exists
        ("encoder.encoder.num_attention_heads", bert.get("num_attention_heads"), gpt["n_head"]),
        ("encoder.encoder.intermediate_size", bert.get("intermediate_size"), d_ff),
        ("encoder.encoder.hidden_act", bert.get("hidden_act", "gelu"), "gelu"),
        ("encoder.encoder.layer_norm_eps", bert.get("layer_norm_eps", 1e-12), 1e-12),
        ("encoder.encoder.position_embedding_type", bert.get("position_embedding_type", "absolute"), "absolute"),
        ("decoder.activation_function", gpt.get("activation_function", "gelu_new"), "gelu_new"),
        ("decoder.layer_norm_epsilon", gpt.get("layer_norm_epsilon", 1e-5), 1e-5),
        ("decoder.add_cross_attention", gpt.get("add_cross_attention"), True),
        ("decoder.scale_attn_weights", gpt.get("scale_attn_weights", True), True),
        ("decoder.scale_attn_by_inverse_layer_idx", gpt.get("scale_attn_by_inverse_layer_idx", False), False),
        ("decoder.bos_token_id", gpt.get("bos_token_id", CLIP_BOS), CLIP_BOS),
        ("decoder.eos_token_id", gpt.get("eos_token_id", CLIP_EOS), CLIP_EOS),
        ("decoder.pad_token_id", gpt.get("pad_token_id", CLIP_PAD), CLIP_PAD),
    ]:
        _require(value == want, f"{key} is {value!r}, expected {want!r}")
    cfg = CaptionerConfig(
        feat_dim=vis.get("hidden_size", bridge.shape[1]), vocab_size=gpt["vocab_size"], pad_id=CLIP_PAD,
        bos_id=CLIP_BOS, eos_id=CLIP_EOS, d_model=d, enc_layers=bert["num_hidden_layers"],
        dec_layers=gpt["n_layer"], n_heads=gpt["n_head"], d_ff=d_ff, dropout=gpt.get("resid_pdrop", 0.1),
        max_enc_positions=bert.get("max_position_embeddings", 512), max_dec_positions=gpt.get("n_positions", 1024))
    tokens = (vis.get("image_size", 224) // vis.get("patch_size", 14)) ** 2 + 1
    return cfg, tokens


# -- names ------------------------------------------------------------------------------------------
def key_map(cfg) -> list[tuple[str, str, str | None]]:
    """(our name, official name, transform) for every tensor of our captioner; transform "T" =
    transpose a GPT-2 Conv1D weight, "row0" = row 0 of BERT's token-type table."""
    rows = [("bridge", "encoder.vis_enc_to_enc_proj", None),
            ("encoder.wpe", "encoder.encoder.embeddings.position_embeddings", None),
            ("encoder.ln_emb", "encoder.encoder.embeddings.LayerNorm", None),
            ("decoder.wte", "decoder.transformer.wte", None),
            ("decoder.wpe", "decoder.transformer.wpe", None),
            ("decoder.ln_f", "decoder.transformer.ln_f", None)]
    for i in range(cfg.enc_layers):
        bert = f"encoder.encoder.encoder.layer.{i}"
        rows += [(f"encoder.layers.{i}.{ours}", f"{bert}.{theirs}", None) for ours, theirs in [
            ("query", "attention.self.query"), ("key", "attention.self.key"), ("value", "attention.self.value"),
            ("proj", "attention.output.dense"), ("ln_attn", "attention.output.LayerNorm"),
            ("fc1", "intermediate.dense"), ("fc2", "output.dense"), ("ln_ffn", "output.LayerNorm")]]
    for i in range(cfg.dec_layers):
        gpt = f"decoder.transformer.h.{i}"
        rows += [(f"decoder.h.{i}.{ours}", f"{gpt}.{theirs}", conv) for ours, theirs, conv in [
            ("ln_1", "ln_1", None), ("ln_2", "ln_2", None), ("ln_cross", "ln_cross_attn", None),
            ("attn.c_attn", "attn.c_attn", "T"), ("attn.c_proj", "attn.c_proj", "T"),
            ("cross.q_attn", "crossattention.q_attn", "T"), ("cross.c_attn", "crossattention.c_attn", "T"),
            ("cross.c_proj", "crossattention.c_proj", "T"),
            ("mlp.c_fc", "mlp.c_fc", "T"), ("mlp.c_proj", "mlp.c_proj", "T")]]
    out = []
    for ours, theirs, conv in rows:  # every module above has a weight; embeddings have no bias
        out.append((f"{ours}.weight", f"{theirs}.weight", conv))
        if not ours.endswith(("wte", "wpe")):
            out.append((f"{ours}.bias", f"{theirs}.bias", None))
    out.append(("encoder.type_emb", "encoder.encoder.embeddings.token_type_embeddings.weight", "row0"))
    return out


def convert_state_dict(sd: dict, cfg) -> dict:
    """Our state dict from the official one; ValueError naming every missing, unexpected or
    misshapen key."""
    import torch

    from .model import Captioner

    want = {k: tuple(v.shape) for k, v in Captioner(cfg).state_dict().items()}
    out, problems, used = {}, [], set()
    for ours, theirs, how in key_map(cfg):
        if theirs not in sd:
            problems.append(f"missing {theirs} (for {ours})")
            continue
        used.add(theirs)
        t = sd[theirs]
        t = t.t() if how == "T" and t.dim() == 2 else t[0] if how == "row0" else t
        if tuple(t.shape) != want[ours]:
            note = " after transposing the Conv1D weight" if how == "T" else " (row 0)" if how == "row0" else ""
            problems.append(f"{theirs} has shape {tuple(sd[theirs].shape)}{note} -> {tuple(t.shape)}, "
                            f"but {ours} needs {want[ours]}")
            continue
        out[ours] = t.detach().to(torch.float32).contiguous().clone()
    ignore = re.compile("|".join(f"(?:{p})" for p, _ in IGNORED))
    extra = sorted(k for k in sd if k not in used and not ignore.fullmatch(k))
    problems += [f"unexpected {k} {tuple(sd[k].shape)}" for k in extra]
    head = sd.get("decoder.lm_head.weight")
    if head is not None and "decoder.wte.weight" in out and not torch.equal(head.float(), out["decoder.wte.weight"]):
        problems.append("decoder.lm_head.weight differs from decoder.transformer.wte.weight (our LM head is tied)")
    if problems:
        shown = "\n  - ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(f"official checkpoint does not fit the captioner ({len(problems)} problem(s)):\n  - {shown}")
    return out


# -- the whole conversion ---------------------------------------------------------------------------
def convert(src: str | Path, out: str | Path, backbone: str = "clip_l14") -> dict:
    """Write our captioner checkpoint (dico.train format, run `dico_official`) for the release at
    `src`; `backbone` is the features.backbone whose cached features it reads (CLIP ViT-L/14)."""
    from .io import torch_save
    from .model import Captioner
    from .tokenizer import CLIP_VOCAB, CaptionTokenizer
    from .train import captioner_payload

    sd, hf = load_release(src)
    for key in ("decoder.transformer.wte.weight", "encoder.vis_enc_to_enc_proj.weight"):
        _require(key in sd, f"no {key} (is this a DiCO VisionEncoderDecoderModel checkpoint?)")
    cfg, tokens = captioner_config(sd, hf)
    _require(tokens <= cfg.max_enc_positions, f"{tokens} visual tokens but only {cfg.max_enc_positions} encoder positions")
    _require(cfg.vocab_size == CLIP_VOCAB, f"vocabulary of {cfg.vocab_size} tokens, expected CLIP's {CLIP_VOCAB} "
             "(49,408 BPE + <|pad|>)")
    model = Captioner(cfg)
    model.load_state_dict(convert_state_dict(sd, cfg), strict=True)
    store = SimpleNamespace(backbone=backbone, dim=cfg.feat_dim, index={"tokens": tokens})  # what the payload records
    spec = {"run": RUN, "method": "official", "seed": None, "source": str(src),
            "hf_config": {"encoder": (hf or {}).get("encoder", {}).get("encoder"), "decoder": (hf or {}).get("decoder")}}
    payload = captioner_payload(model.eval(), CaptionTokenizer(), store, spec, step=None, val=None)
    torch_save(payload, out)
    log.info("official DiCO -> %s: %.1fM parameters, d %d, %d+%d layers, %d heads, vocab %d, backbone %s %dx%d",
             out, model.num_parameters() / 1e6, cfg.d_model, cfg.enc_layers, cfg.dec_layers, cfg.n_heads,
             cfg.vocab_size, backbone, tokens, cfg.feat_dim)
    return payload


def cmd_convert(args):
    convert(args.src, args.out, backbone=args.backbone)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert-official", help="released DiCO checkpoint (HF layout) -> our captioner checkpoint")
    p.add_argument("--src", required=True, help="the release: HF folder, its zip/tar, or pytorch_model.bin / "
                   "model.safetensors (config.json beside it)")
    p.add_argument("--out", required=True, help="captioner checkpoint to write, e.g. results/runs/dico_official/model.pt")
    p.add_argument("--backbone", default="clip_l14", help="features.backbone entry whose features the model reads")
    p.set_defaults(fn=cmd_convert)
    return p
