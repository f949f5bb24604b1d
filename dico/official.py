"""The released DiCO checkpoint (aimagelab/DiCO, "dico-ViTL14") as one of our captioner checkpoints,
and back.

    dico convert-official --src resources/weights/dico-ViTL14.zip --out results/runs/dico_official/model.pt
    dico export-official --checkpoint results/runs/dico/model.pt --out DIR [--zip] [--backbone-checkpoint ViT-L-14.pt]

The release is an HF `save_pretrained` folder of the official VisionEncoderDecoderModel
(config.json + pytorch_model.bin or model.safetensors, loaded in demo.py by AutoModel.from_pretrained
after register_models()). Shared on Google Drive as one file, so we ASSUME a zip of that folder; the
converter sniffs what it gets instead of trusting the name: a folder, a zip or tar of it (the folder
may be nested), or a bare weights file (.bin / .safetensors / DeepSpeed mp_rank_*_model_states.pt,
with config.json beside it or, without one, sizes read off the tensor shapes and 8 heads).

Names map per the table in dico/model.py's docstring. GPT-2's Conv1D weights are [in, out] and are
transposed; BERT's token-type table contributes its row 0 (the only type the encoder is fed). Keys
we do not use are named in IGNORED and dropped; any other key, a missing one or a shape that does
not fit is an error naming it, since it would mean a different architecture. The config.json's
generation settings that would change the official `generate()` (repetition penalty, n-gram
blocking, min length, ...) are reported and recorded in the checkpoint's spec.

Files from the internet are data, not code: a pytorch_model.bin that pickles anything besides
tensors (torch.load(weights_only=True) refuses it) is only unpickled when the file is pinned
(official.sha256 = --sha256, checked before anything is read) or trusted explicitly
(official.trust_pickle = --trust-pickle).

`export` writes one of our checkpoints in the release's layout (what transformers 4.20's
save_pretrained writes for the official VisionEncoderDecoderModel: config.json + pytorch_model.bin,
4.20's persistent buffers included; the tables the official forward never reads, BERT's word
embeddings, token type 1 and pooler, as zeros), optionally with the frozen CLIP vision tower in HF
CLIPVisionTransformer naming. `convert(export(x)) == x` exactly.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
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


def _load_pickle(path: Path, trusted: bool):
    """torch.load with weights_only=True; a file that pickles other objects is unpickled only when
    `trusted` (pinned by sha256 or --trust-pickle), since unpickling can run code from the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError naming the global, or a file that is no torch file at all
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if glob is None:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        if not trusted:
            raise ValueError(
                f"{path} pickles a Python object ({glob.group(1)}) besides tensors, so reading it would run code "
                "from the file (torch.load weights_only=False). Either pin the file: set official.sha256 to its "
                "sha256 (passed as `dico convert-official --sha256`), or, if you trust where it came from, set "
                "official.trust_pickle: true (`--trust-pickle`)") from None
    log.warning("%s pickles %s besides tensors: unpickled with weights_only=False (pinned by sha256 or trusted)",
                path, glob.group(1))
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_tensors(path: Path, trusted: bool = False) -> dict:
    if path.name.endswith(".index.json"):  # sharded save_pretrained
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(_load_tensors(path.parent / shard, trusted))
        return out
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("reading .safetensors needs the safetensors package (installed with "
                              "open_clip_torch)") from None
        return load_file(str(path))
    blob = _load_pickle(path, trusted)
    for key in ("module", "state_dict", "model"):  # DeepSpeed / Lightning-style wrappers
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    return {k.removeprefix("module."): v for k, v in blob.items()}


def _check_pin(src: Path, sha256: str) -> None:
    """--sha256 pins the file given (archive or weights), or a folder's weights file."""
    from .download import sha256_file

    target = src if src.is_file() else _find(src, WEIGHT_FILES)
    if target is None:
        raise FileNotFoundError(f"{src}: no {' / '.join(WEIGHT_FILES)} inside")
    digest = sha256_file(target)
    if digest != sha256.strip().lower():
        raise ValueError(f"{target}: sha256 is {digest}, but official.sha256 (--sha256) pins {sha256}; "
                         "download the release again, or correct official.sha256 if the file is the right one")


def load_release(src: str | Path, sha256: str | None = None, trust_pickle: bool = False) -> tuple[dict, dict | None]:
    """(state dict, parsed config.json or None) of the release at `src` (folder, archive or file).
    `sha256` (checked first) or `trust_pickle` allow weights that pickle more than tensors."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: the official DiCO checkpoint is not there (download it with "
                                f"`snakemake download_official` or by hand from the DiCO README's Drive link)")
    if sha256:
        _check_pin(src, sha256)
    return _read_release(src, trusted=bool(sha256) or trust_pickle)


def _read_release(src: Path, trusted: bool) -> tuple[dict, dict | None]:
    if src.is_file() and _is_archive(src):
        near = src.parent if os.access(src.parent, os.W_OK) else None  # /tmp may be too small for 1.5 GB
        with tempfile.TemporaryDirectory(prefix=".official-", dir=near) as tmp:
            try:
                return _read_release(_unpack(src, Path(tmp)), trusted)
            except ValueError as e:  # name the archive the user has, not the temporary it was unpacked to
                raise ValueError(f"{src}: {str(e).replace(tmp + os.sep, '')}") from None
    if src.is_dir():
        weights, config = _find(src, WEIGHT_FILES), _find(src, ["config.json"])
        if weights is None:
            raise FileNotFoundError(f"{src}: no {' / '.join(WEIGHT_FILES)} inside")
    else:
        weights, config = src, src.with_name("config.json")
    hf_config = json.loads(config.read_text()) if config is not None and config.exists() else None
    log.info("official checkpoint: weights %s, config %s", weights, config if hf_config else "none")
    return _load_tensors(weights, trusted), hf_config


# generation settings of a 4.20 config whose non-default values change what generate() does; the
# official scripts pass num_beams and max_length explicitly, so those two are not listed
GENERATION_DEFAULTS = {"min_length": 0, "do_sample": False, "early_stopping": False, "num_beam_groups": 1,
                       "diversity_penalty": 0.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
                       "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
                       "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
                       "exponential_decay_length_penalty": None}


def generation_overrides(hf: dict | None) -> dict:
    """The release config's top-level generation settings that differ from transformers' defaults
    (the top level is what the official model.generate reads)."""
    return {k: hf[k] for k, default in GENERATION_DEFAULTS.items() if hf and k in hf and hf[k] != default}


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
def convert(src: str | Path, out: str | Path, backbone: str = "clip_l14", sha256: str | None = None,
            trust_pickle: bool = False) -> dict:
    """Write our captioner checkpoint (dico.train format, run `dico_official`) for the release at
    `src`; `backbone` is the features.backbone whose cached features it reads (CLIP ViT-L/14).
    `sha256` / `trust_pickle`: see load_release."""
    from .io import torch_save
    from .model import Captioner
    from .tokenizer import CLIP_VOCAB, CaptionTokenizer
    from .train import captioner_payload

    sd, hf = load_release(src, sha256=sha256, trust_pickle=trust_pickle)
    for key in ("decoder.transformer.wte.weight", "encoder.vis_enc_to_enc_proj.weight"):
        _require(key in sd, f"no {key} (is this a DiCO VisionEncoderDecoderModel checkpoint?)")
    cfg, tokens = captioner_config(sd, hf)
    _require(tokens <= cfg.max_enc_positions, f"{tokens} visual tokens but only {cfg.max_enc_positions} encoder positions")
    _require(cfg.vocab_size == CLIP_VOCAB, f"vocabulary of {cfg.vocab_size} tokens, expected CLIP's {CLIP_VOCAB} "
             "(49,408 BPE + <|pad|>)")
    model = Captioner(cfg)
    model.load_state_dict(convert_state_dict(sd, cfg), strict=True)
    store = SimpleNamespace(backbone=backbone, dim=cfg.feat_dim, index={"tokens": tokens})  # what the payload records
    overrides = generation_overrides(hf)
    if overrides:
        log.warning("the release's config.json sets generation options that the official generate() applies "
                    "and dico's beam search does not: %s", overrides)
    spec = {"run": RUN, "method": "official", "seed": None, "source": str(src), "hf_generation": overrides,
            "hf_config": {"encoder": (hf or {}).get("encoder", {}).get("encoder"), "decoder": (hf or {}).get("decoder")}}
    payload = captioner_payload(model.eval(), CaptionTokenizer(), store, spec, step=None, val=None)
    torch_save(payload, out)
    log.info("official DiCO -> %s: %.1fM parameters, d %d, %d+%d layers, %d heads, vocab %d, backbone %s %dx%d",
             out, model.num_parameters() / 1e6, cfg.d_model, cfg.enc_layers, cfg.dec_layers, cfg.n_heads,
             cfg.vocab_size, backbone, tokens, cfg.feat_dim)
    return payload


# -- ours -> the release's layout --------------------------------------------------------------------
BERT_WORDS = 30522  # BertConfig's default vocabulary, kept (unused) by the official encoder
VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
           "image_size": 224, "patch_size": 14}  # openai/clip-vit-large-patch14, the official backbone


def official_state_dict(model) -> dict:
    """The release's state dict (official names) of our Captioner: the inverse of key_map, plus
    what 4.20's save_pretrained also wrote (persistent buffers, lm_head.weight sharing wte) and the
    tables the official forward never reads, as zeros (BERT word embeddings, token type 1, pooler)."""
    import torch

    cfg, ours = model.cfg, model.state_dict()
    sd = {}
    for name, theirs, how in key_map(cfg):
        t = ours[name].detach().to("cpu", torch.float32)
        if how == "T":
            t = t.t()
        elif how == "row0":  # token type 0 is the encoder's; row 1 exists in BERT's table, unused
            t = torch.stack([t, torch.zeros_like(t)])
        sd[theirs] = t.contiguous().clone()
    d, bert = cfg.d_model, "encoder.encoder"
    sd[f"{bert}.embeddings.word_embeddings.weight"] = torch.zeros(BERT_WORDS, d)
    sd[f"{bert}.embeddings.position_ids"] = torch.arange(cfg.max_enc_positions)[None]
    sd[f"{bert}.pooler.dense.weight"], sd[f"{bert}.pooler.dense.bias"] = torch.zeros(d, d), torch.zeros(d)
    n = cfg.max_dec_positions
    causal = torch.ones(n, n, dtype=torch.uint8).tril().view(1, 1, n, n)
    for i in range(cfg.dec_layers):
        for att in ("attn", "crossattention"):  # GPT2Attention registered both buffers in 4.20
            sd[f"decoder.transformer.h.{i}.{att}.bias"] = causal.clone()
            sd[f"decoder.transformer.h.{i}.{att}.masked_bias"] = torch.tensor(-1e4)
    sd["decoder.lm_head.weight"] = sd["decoder.transformer.wte.weight"]  # tied: one storage in torch.save
    return sd


def vision_tower(backbone_checkpoint: str | Path) -> tuple[dict, dict]:
    """(encoder.vision_encoder.* tensors in HF CLIPVisionTransformer naming, its CLIPVisionConfig
    fields) of an OpenAI-format CLIP ViT (as clip_models load it: TorchScript .pt, state dict or
    {'state_dict': ...}). OpenAI's fused in_proj is split into q|k|v; visual.proj (CLIP's projection
    head, not part of the tower) is dropped; heads = width / 64 and QuickGELU, as OpenAI CLIP."""
    import torch

    from .evaluator import load_evaluator

    v = load_evaluator(backbone_checkpoint, format="openai").model.visual
    if not hasattr(v, "conv1"):
        raise ValueError(f"{backbone_checkpoint}: --backbone-checkpoint must be a CLIP ViT (the official "
                         f"backbone is ViT-L/14), not {type(v).__name__}")
    w, patch = v.conv1.weight.shape[0], v.conv1.weight.shape[-1]
    grid = math.isqrt(v.positional_embedding.shape[0] - 1)
    blocks = v.transformer.resblocks
    sd = {"embeddings.class_embedding": v.class_embedding, "embeddings.patch_embedding.weight": v.conv1.weight,
          "embeddings.position_embedding.weight": v.positional_embedding,
          "embeddings.position_ids": torch.arange(grid * grid + 1)[None],
          "pre_layrnorm.weight": v.ln_pre.weight, "pre_layrnorm.bias": v.ln_pre.bias,
          "post_layernorm.weight": v.ln_post.weight, "post_layernorm.bias": v.ln_post.bias}
    for i, blk in enumerate(blocks):
        hf = f"encoder.layers.{i}"
        for part, wt, bs in zip("qkv", blk.attn.in_proj_weight.chunk(3), blk.attn.in_proj_bias.chunk(3)):
            sd[f"{hf}.self_attn.{part}_proj.weight"], sd[f"{hf}.self_attn.{part}_proj.bias"] = wt, bs
        for theirs, mod in [("self_attn.out_proj", blk.attn.out_proj), ("layer_norm1", blk.ln_1),
                            ("layer_norm2", blk.ln_2), ("mlp.fc1", blk.mlp.c_fc), ("mlp.fc2", blk.mlp.c_proj)]:
            sd[f"{hf}.{theirs}.weight"], sd[f"{hf}.{theirs}.bias"] = mod.weight, mod.bias
    config = {"hidden_size": w, "intermediate_size": blocks[0].mlp.c_fc.weight.shape[0],
              "num_hidden_layers": len(blocks), "num_attention_heads": w // 64, "image_size": grid * patch,
              "patch_size": patch}
    return {f"encoder.vision_encoder.{k}": t.detach().float().contiguous().clone() for k, t in sd.items()}, config


def release_config(cfg, vision: dict) -> dict:
    """config.json of the official VisionEncoderDecoderConfig (to_dict layout of transformers 4.20):
    encoder = VisionEncoderEncoderConfig{vision_encoder: CLIPVisionConfig, encoder: BertConfig as
    main.py get_model builds it (d_embed included: the official config reads it)}, decoder =
    GPT2Config with cross-attention, plus main.py's top-level ids."""
    from .tokenizer import CLIP_BOS, CLIP_EOS, CLIP_PAD

    p, d = cfg.dropout, cfg.d_model
    clip_vision = {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                   "dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
                   **vision}
    bert = {"model_type": "bert", "hidden_size": d, "d_embed": d, "num_hidden_layers": cfg.enc_layers,
            "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
            "hidden_dropout_prob": p, "attention_probs_dropout_prob": p, "layer_norm_eps": 1e-12,
            "max_position_embeddings": cfg.max_enc_positions, "type_vocab_size": 2, "vocab_size": BERT_WORDS,
            "position_embedding_type": "absolute", "initializer_range": 0.02, "pad_token_id": 0, "use_cache": True}
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": d, "n_layer": cfg.dec_layers,
            "n_head": cfg.n_heads, "n_inner": None if cfg.d_ff == 4 * d else cfg.d_ff,
            "n_positions": cfg.max_dec_positions, "vocab_size": cfg.vocab_size, "activation_function": "gelu_new",
            "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p, "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "use_cache": True, "add_cross_attention": True, "is_decoder": True,
            "tie_word_embeddings": True, "bos_token_id": CLIP_BOS, "eos_token_id": CLIP_EOS, "pad_token_id": CLIP_PAD}
    encoder = {"model_type": "vision-encoder-encoder", "vision_encoder": clip_vision, "encoder": bert,
               "is_encoder_decoder": False, "hidden_size": d}
    return {"architectures": ["VisionEncoderDecoderModel"], "model_type": "vision-encoder-decoder",
            "encoder": encoder, "decoder": gpt2, "is_encoder_decoder": True, "add_cross_attention": True,
            "decoder_start_token_id": CLIP_BOS, "bos_token_id": CLIP_BOS, "eos_token_id": CLIP_EOS,
            "pad_token_id": CLIP_PAD, "vocab_size": cfg.vocab_size, "hidden_size": d, "tie_word_embeddings": False,
            "torch_dtype": "float32", "transformers_version": "4.20.0"}


def _grid_config(dim: int, tokens: int) -> dict:
    """The vision config without a tower: ViT-L/14's for its 257 x 1024 grid, else one that only
    sizes the grid (width, patch 14, 1 + g*g tokens)."""
    if (dim, tokens) == (1024, 257):
        return dict(VIT_L14)
    grid = math.isqrt(tokens - 1)
    _require(grid * grid + 1 == tokens, f"{tokens} visual tokens is not 1 + a square grid of patches")
    return {"hidden_size": dim, "intermediate_size": 4 * dim, "num_hidden_layers": 1,
            "num_attention_heads": max(1, dim // 64), "patch_size": 14, "image_size": 14 * grid}


def _write_folder(out: Path, files: dict) -> None:
    """Write {name: writer(path)} into a temporary folder next to `out`, then rename it to `out`."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def export(checkpoint: str | Path, out: str | Path, *, zip: bool = False, backbone_checkpoint: str | Path | None = None,
           weights: str = "pytorch_model.bin") -> Path:
    """Write our captioner checkpoint in the release's layout at `out`: a folder (config.json +
    `weights`), or with zip=True a zip of it (entries `<out stem>/...`). With `backbone_checkpoint`
    the frozen vision tower is included as encoder.vision_encoder.*."""
    import torch

    from .io import atomic_path
    from .tokenizer import CLIP_VOCAB
    from .train import load_captioner

    model, tok, payload = load_captioner(checkpoint)
    if payload["tokenizer"].get("clip_ids") is not None or model.cfg.vocab_size != CLIP_VOCAB:
        raise ValueError(f"{checkpoint}: its decoder predicts {model.cfg.vocab_size} ids (model.vocab: train), but "
                         f"the release's predicts all {CLIP_VOCAB} CLIP ids; only checkpoints trained with "
                         "model.vocab: full can be exported (set model.vocab: full and retrain)")
    sd = official_state_dict(model)
    grid = payload["backbone"]
    if backbone_checkpoint is not None:
        tower, vision = vision_tower(backbone_checkpoint)
        got = (vision["hidden_size"], (vision["image_size"] // vision["patch_size"]) ** 2 + 1)
        _require(got == (grid["dim"], grid["tokens"]),
                 f"--backbone-checkpoint {backbone_checkpoint} gives {got[1]} x {got[0]} grid features, but "
                 f"{checkpoint} was trained on {grid['tokens']} x {grid['dim']} ({grid['name']})")
        sd.update(tower)
    else:
        vision = _grid_config(grid["dim"], grid["tokens"])
        log.warning("no --backbone-checkpoint: the export has no encoder.vision_encoder.* weights (the official "
                    "code needs them to run on pixels)")
    config = json.dumps(release_config(model.cfg, vision), indent=2) + "\n"
    if weights == "pytorch_model.bin":
        save = lambda path: torch.save(sd, path)  # noqa: E731  (lm_head and wte share one storage)
    elif weights == "model.safetensors":
        from safetensors.torch import save_file

        plain = {k: v for k, v in sd.items() if k != "decoder.lm_head.weight"}  # safetensors keeps no shared tensors
        save = lambda path: save_file(plain, str(path))  # noqa: E731
    else:
        raise ValueError(f"--weights must be pytorch_model.bin or model.safetensors, not {weights!r}")
    out = Path(out)
    files = {"config.json": lambda path: path.write_text(config), weights: save}
    if not zip:
        _write_folder(out, files)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp, atomic_path(out) as part:
            folder = Path(tmp) / out.stem
            _write_folder(folder, files)
            with zipfile.ZipFile(part, "w") as zf:
                for name in files:
                    zf.write(folder / name, f"{out.stem}/{name}")
    log.info("%s -> %s: release layout (%s%s), d %d, %d+%d layers, vocab %d", checkpoint, out, weights,
             ", vision tower" if backbone_checkpoint else "", model.cfg.d_model, model.cfg.enc_layers,
             model.cfg.dec_layers, model.cfg.vocab_size)
    return out


def cmd_convert(args):
    convert(args.src, args.out, backbone=args.backbone, sha256=args.sha256, trust_pickle=args.trust_pickle)


def cmd_export(args):
    export(args.checkpoint, args.out, zip=args.zip, backbone_checkpoint=args.backbone_checkpoint, weights=args.weights)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert-official", help="released DiCO checkpoint (HF layout) -> our captioner checkpoint")
    p.add_argument("--src", required=True, help="the release: HF folder, its zip/tar, or pytorch_model.bin / "
                   "model.safetensors (config.json beside it)")
    p.add_argument("--out", required=True, help="captioner checkpoint to write, e.g. results/runs/dico_official/model.pt")
    p.add_argument("--backbone", default="clip_l14", help="features.backbone entry whose features the model reads")
    p.add_argument("--sha256", help="official.sha256: the sha256 of --src (or of the weights file in a --src "
                   "folder), checked first; a pinned file may pickle more than tensors")
    p.add_argument("--trust-pickle", action="store_true", help="official.trust_pickle: unpickle weights that hold "
                   "Python objects besides tensors (can run code from the file)")
    p.set_defaults(fn=cmd_convert)
    e = subparsers.add_parser("export-official", help="our captioner checkpoint -> the released DiCO checkpoint's "
                              "layout (HF save_pretrained folder of the official VisionEncoderDecoderModel)")
    e.add_argument("--checkpoint", required=True, help="our captioner checkpoint (model.vocab: full), e.g. "
                   "results/runs/dico/model.pt")
    e.add_argument("--out", required=True, help="the folder to write (or the zip, with --zip)")
    e.add_argument("--zip", action="store_true", help="write a zip holding the folder")
    e.add_argument("--backbone-checkpoint", help="OpenAI-format CLIP ViT weights (e.g. ViT-L-14.pt): include the "
                   "frozen vision tower as encoder.vision_encoder.*")
    e.add_argument("--weights", default="pytorch_model.bin", choices=["pytorch_model.bin", "model.safetensors"],
                   help="weights file (transformers 4.20, which the official code pins, writes pytorch_model.bin)")
    e.set_defaults(fn=cmd_export)
    return p
