"""The names and sizes of the release against ours, both ways: the captioner's config from the release's
config.json (or its tensor shapes) and back, and the table of tensor names (`key_map`).

Names map per the table in dico/model.py's docstring. GPT-2's Conv1D weights are [in, out] and are
transposed; BERT's token-type table contributes its row 0 (the only type the encoder is fed). Keys
we do not use are named in IGNORED and dropped; any other key, a missing one or a shape that does
not fit is an error naming it, since it would mean a different architecture.
"""
from __future__ import annotations

import logging
import re

from ..model import Captioner, CaptionerConfig
from ..tokenizer import CLIP_BOS, CLIP_EOS, CLIP_PAD

log = logging.getLogger("dico")

IGNORED = [  # (pattern, why it is not needed)
    (r"encoder\.vision_encoder\..*", "frozen CLIP ViT-L/14 tower: our features come from the same OpenAI weights"),
    (r"encoder\.encoder\.embeddings\.word_embeddings\.weight", "BERT word table: the encoder is fed features"),
    (r"encoder\.encoder\.embeddings\.(position_ids|token_type_ids)", "index buffers"),
    (r"encoder\.encoder\.pooler\..*", "BERT pooler: unused"),
    (r"decoder\.transformer\.h\.\d+\.(attn|crossattention)\.(bias|masked_bias)", "GPT-2 causal-mask buffers"),
    (r"decoder\.lm_head\.weight", "tied to decoder.transformer.wte (checked equal)"),
]


# -- sizes ------------------------------------------------------------------------------------------
def require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"official checkpoint: {what}; this converter maps the DiCO architecture only")


def _n_layers(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def captioner_config(sd: dict, hf: dict | None):
    """CaptionerConfig of the release (from config.json, checked; else read off the shapes) and the
    number of visual tokens its backbone gives."""
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
    require(bool(bert and gpt and vis), "config.json lacks encoder.encoder / encoder.vision_encoder / decoder")
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
        require(value == want, f"{key} is {value!r}, expected {want!r}")
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


def release_config(cfg, vision: dict) -> dict:
    """config.json of the official VisionEncoderDecoderConfig (to_dict layout of transformers 4.20):
    encoder = VisionEncoderEncoderConfig{vision_encoder: CLIPVisionConfig, encoder: BertConfig as
    main.py get_model builds it (d_embed included: the official config reads it)}, decoder =
    GPT2Config with cross-attention, plus main.py's top-level ids."""
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
