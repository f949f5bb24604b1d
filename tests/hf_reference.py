"""The official DiCO captioner built from the real `transformers` classes, as an independent reference.

The official code (main.py `get_model`) composes a frozen CLIPVisionTransformer, a Linear bridge
(`vis_enc_to_enc_proj`), a BertModel fed `inputs_embeds` and a GPT2LMHeadModel with cross-attention.
Here the same modules are built with random weights from transformers' own classes (never from
dico.model), so a test comparing them with our Captioner checks our GELU variants, LayerNorm
placement and eps, q|k|v order, Conv1D transposes, token-type row, positions and tied head.

    build_hf_captioner(cfg, seed=0) -> (bridge, bert, gpt2)
    hf_logits(modules, feats, tokens) -> logits [N, L, V]
    write_release(out, cfg, *, seed=0, zip=False, vision_sd=None) -> out

`write_release` saves them as the official release is laid out: config.json in the schema of the
official VisionEncoderDecoderConfig (encoder = VisionEncoderEncoderConfig{vision_encoder, encoder},
decoder = GPT2Config) and the state dict under the official key names, in pytorch_model.bin as
transformers 4.20's save_pretrained writes it (the 4.20 persistent buffers included: BERT's and
CLIP's position_ids, GPT-2's attn/crossattention bias and masked_bias; lm_head.weight sharing
wte's storage).

Also here: `reference_beam_search`, loops over images, beams and candidates written from the rules
of transformers 4.20 (generation_utils.beam_search + generation_beam_search.BeamHypotheses, and the
official utils.py CustomBeamSearchScorer), with the two rules transformers 5.x changed behind a
switch; and `hf_generate`, transformers' own `generate()` on these modules.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from dico.model import Captioner, CaptionerConfig

BERT_WORDS = 30522  # BertConfig's default vocabulary: the official encoder keeps this unused table


# -- the modules ------------------------------------------------------------------------------------
def bert_config(cfg: CaptionerConfig):
    """BertConfig as the official main.py builds it (hidden, layers, heads, FFN; defaults otherwise:
    gelu, eps 1e-12, absolute positions, 2 token types), sized by `cfg`."""
    from transformers import BertConfig

    return BertConfig(hidden_size=cfg.d_model, d_embed=cfg.d_model, num_hidden_layers=cfg.enc_layers,
                      num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
                      max_position_embeddings=cfg.max_enc_positions, hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout, vocab_size=BERT_WORDS)


def gpt2_config(cfg: CaptionerConfig):
    """GPT2Config as main.py sets it: cross-attention on, n_layer/n_embd/n_head, vocabulary and
    special ids (defaults otherwise: gelu_new, eps 1e-5, n_inner = 4 * n_embd)."""
    from transformers import GPT2Config

    return GPT2Config(add_cross_attention=True, is_decoder=True, n_layer=cfg.dec_layers, n_embd=cfg.d_model,
                      n_head=cfg.n_heads, n_inner=None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
                      vocab_size=cfg.vocab_size, n_positions=cfg.max_dec_positions, bos_token_id=cfg.bos_id,
                      eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, resid_pdrop=cfg.dropout,
                      embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)


def build_hf_captioner(cfg: CaptionerConfig, seed: int = 0):
    """(bridge nn.Linear(feat, d), BertModel, GPT2LMHeadModel), random weights, eval mode. Every
    parameter, LayerNorms included, is moved off its init by N(0, 0.1) so a swapped or misplaced
    tensor changes the logits."""
    from transformers import BertModel, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bridge = nn.Linear(cfg.feat_dim, cfg.d_model)
        bert = BertModel(bert_config(cfg))
        gpt2 = GPT2LMHeadModel(gpt2_config(cfg))
        with torch.no_grad():
            for m in (bridge, bert, gpt2):
                for p in m.parameters():  # gpt2's tied lm_head is wte: moved once
                    p.add_(0.1 * torch.randn_like(p))
    assert gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr(), "GPT-2 head not tied"
    return bridge.eval(), bert.eval(), gpt2.eval()


@torch.no_grad()
def hf_memory(modules, feats: torch.Tensor) -> torch.Tensor:
    """The encoder output the official VisionEncoderEncoderModel gives for grid features `feats`."""
    bridge, bert, _ = modules
    return bert(inputs_embeds=bridge(feats)).last_hidden_state


@torch.no_grad()
def hf_logits(modules, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Decoder logits [N, L, V] of `tokens` [N, L] (ids, BOS first) on features [N, T, F]."""
    return modules[2](input_ids=tokens, encoder_hidden_states=hf_memory(modules, feats)).logits


# -- the release layout -----------------------------------------------------------------------------
def _buffers_420(prefix: str, n: int) -> dict:
    """GPT-2 attention buffers transformers 4.20 saved with every attention module."""
    return {f"{prefix}.bias": torch.ones(n, n, dtype=torch.uint8).tril().view(1, 1, n, n),
            f"{prefix}.masked_bias": torch.tensor(-1e4)}


def official_state_dict(modules, vision_sd: dict | None = None) -> dict:
    """{official key: tensor} of the VisionEncoderDecoderModel holding `modules` (and the vision
    tower `vision_sd`, CLIPVisionTransformer keys, if given), as 4.20 would save it."""
    bridge, bert, gpt2 = modules
    sd = {f"encoder.vis_enc_to_enc_proj.{k}": v for k, v in bridge.state_dict().items()}
    sd.update({f"encoder.encoder.{k}": v for k, v in bert.state_dict().items()})
    sd["encoder.encoder.embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    g = gpt2.state_dict()
    g["lm_head.weight"] = gpt2.transformer.wte.weight  # saved by 4.20 (shares wte's storage)
    sd.update({f"decoder.{k}": v for k, v in g.items()})
    n = gpt2.config.n_positions
    for i in range(gpt2.config.n_layer):
        for att in ("attn", "crossattention"):
            sd.update(_buffers_420(f"decoder.transformer.h.{i}.{att}", n))
    if vision_sd is not None:
        vis = dict(vision_sd)
        vis.setdefault("embeddings.position_ids",
                       torch.arange(vis["embeddings.position_embedding.weight"].shape[0])[None])
        sd.update({f"encoder.vision_encoder.{k}": v for k, v in vis.items()})
    return {k: v.detach() for k, v in sd.items()}


def vision_config_of(vision_sd: dict | None, cfg: CaptionerConfig) -> dict:
    """CLIPVisionConfig fields of the tower: read off `vision_sd` (heads = width / 64 as OpenAI
    CLIP), or, without a tower, ViT-L/14's when the features are 1024 wide, else a small grid that
    fits the encoder positions (patch 14)."""
    if vision_sd is not None:
        patch = vision_sd["embeddings.patch_embedding.weight"]
        width, positions = patch.shape[0], vision_sd["embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers."))
        grid = math.isqrt(positions - 1)
        return {"hidden_size": width, "intermediate_size": vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                "num_hidden_layers": layers, "num_attention_heads": width // 64, "patch_size": patch.shape[-1],
                "image_size": grid * patch.shape[-1], "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    if cfg.feat_dim == 1024 and cfg.max_enc_positions >= 257:
        return {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 224, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    grid = min(16, math.isqrt(cfg.max_enc_positions - 1))  # no tower weights: a config that only sizes the grid
    return {"hidden_size": cfg.feat_dim, "intermediate_size": 4 * cfg.feat_dim, "num_hidden_layers": 1,
            "num_attention_heads": max(1, cfg.feat_dim // 64), "patch_size": 14, "image_size": 14 * grid}


def release_config(modules, vision: dict) -> dict:
    """config.json of the release: the official VisionEncoderDecoderConfig.to_dict() layout, with
    the sub-configs as transformers' own config classes serialise them."""
    from transformers import CLIPVisionConfig

    _, bert, gpt2 = modules
    vis = CLIPVisionConfig(**vision).to_dict()
    enc = {"model_type": "vision-encoder-encoder", "vision_encoder": vis, "encoder": bert.config.to_dict(),
           "is_encoder_decoder": False, "hidden_size": bert.config.hidden_size}
    c = gpt2.config
    return {"architectures": ["VisionEncoderDecoderModel"], "model_type": "vision-encoder-decoder",
            "encoder": enc, "decoder": c.to_dict(), "is_encoder_decoder": True, "add_cross_attention": True,
            "decoder_start_token_id": c.bos_token_id, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id, "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.20.0"}


def write_release(out: Path, cfg: CaptionerConfig, *, seed: int = 0, zip: bool = False, vision_sd: dict | None = None,
                  weights: str = "pytorch_model.bin") -> Path:
    """The release of `build_hf_captioner(cfg, seed)` at `out`: a folder (config.json + weights), or,
    with zip=True, a zip at `out` holding that folder as `<out.stem>/` (as a zipped save_pretrained
    folder on a Drive). `weights`: pytorch_model.bin (what 4.20 writes) or model.safetensors."""
    out = Path(out)
    modules = build_hf_captioner(cfg, seed)
    sd = official_state_dict(modules, vision_sd)
    files = {"config.json": json.dumps(release_config(modules, vision_config_of(vision_sd, cfg)), indent=2).encode()}
    folder = out.with_suffix("") if zip else out
    folder.mkdir(parents=True, exist_ok=zip)
    (folder / "config.json").write_bytes(files["config.json"])
    if weights == "pytorch_model.bin":
        torch.save(sd, folder / weights)
    elif weights == "model.safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(folder / weights))
    else:
        raise ValueError(f"write_release: weights must be pytorch_model.bin or model.safetensors, not {weights!r}")
    if not zip:
        return out
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{out.stem}/{f.name}")
            f.unlink()
    folder.rmdir()
    return out


def load_modules(folder: Path):
    """(bridge, bert, gpt2[, vision]) built from a release folder's config.json with transformers'
    classes and loaded strictly from its weights: the release runs in the official classes."""
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    conf = json.loads((folder / "config.json").read_text())
    path = folder / "pytorch_model.bin"
    sd = torch.load(path, weights_only=True) if path.exists() else __import__(
        "safetensors.torch", fromlist=["load_file"]).load_file(str(folder / "model.safetensors"))

    def part(prefix, drop=None):  # the keys under prefix, less the 4.20 buffers 5.x no longer keeps
        return {k[len(prefix):]: v for k, v in sd.items()
                if k.startswith(prefix) and not (drop and re.search(drop, k))}

    bert = BertModel(BertConfig(**conf["encoder"]["encoder"]))
    bert.load_state_dict(part("encoder.encoder.", r"\.position_ids$"), strict=True)
    gpt2 = GPT2LMHeadModel(GPT2Config(**conf["decoder"]))
    gpt2.load_state_dict(part("decoder.", r"\.(attn|crossattention)\.(bias|masked_bias)$"), strict=True)
    proj = part("encoder.vis_enc_to_enc_proj.")
    bridge = nn.Linear(proj["weight"].shape[1], proj["weight"].shape[0])
    bridge.load_state_dict(proj, strict=True)
    modules = [bridge.eval(), bert.eval(), gpt2.eval()]
    vis = part("encoder.vision_encoder.", r"\.position_ids$")
    if vis:
        tower = CLIPVisionModel(CLIPVisionConfig(**conf["encoder"]["vision_encoder"]))
        tower.load_state_dict(vis, strict=True)  # 5.x: CLIPVisionModel is the 4.20 CLIPVisionTransformer
        modules.append(tower.eval())
    return tuple(modules)


def to_captioner(modules, cfg: CaptionerConfig) -> Captioner:
    """Our Captioner holding the HF modules' weights (through dico.official's key map)."""
    from dico.official import convert_state_dict

    model = Captioner(cfg)
    model.load_state_dict(convert_state_dict(official_state_dict(modules), cfg), strict=True)
    return model.eval()


# -- beam search references -------------------------------------------------------------------------
RULES_5X = ("done_test", "last_step")  # the two rules transformers 5.x changed (reference_beam_search)


def reference_beam_search(next_logprobs, B: int, k: int, max_len: int, *, bos: int, eos: int,
                          length_penalty: float = 1.0, num_return: int | None = None, rules="4.20",
                          stats: dict | None = None):
    """Beam search by the rules of transformers 4.20, one image, beam and candidate at a time.

    next_logprobs(b, prefixes) -> float32 tensor [len(prefixes), V]: log-softmax of the next token
    for image b after each prefix (full prefixes, no cache). Returns, per image, the best
    `num_return` (default k) as lists of (tokens, score): finished ones end in EOS, cut ones don't.

    rules: "4.20", "5.x" (both of RULES_5X), or a collection of RULES_5X names, which switch on what
    transformers 5.x does instead: "done_test" = the done test compares with the best running
    (non-EOS) sum instead of the best of the 2k candidates; "last_step" = at the last step every
    candidate of rank < k is finished, normalised by max_len - 1, instead of offering the k live
    beams with sum / max_len**lp. `stats` (a dict) counts the events met: eos_added, eos_dropped
    (EOS of rank >= k), done (before max_len), finalized (images that reached max_len).
    """
    changed = set() if rules == "4.20" else set(RULES_5X) if rules == "5.x" else set(rules)
    assert changed <= set(RULES_5X), rules
    lp, num_return = length_penalty, num_return or k
    stats = {} if stats is None else stats
    count = lambda key: stats.__setitem__(key, stats.get(key, 0) + 1)  # noqa: E731
    results = []
    for b in range(B):
        beams = [([bos], 0.0)] + [([bos], -1e9)] * (k - 1)  # (tokens, running sum)
        heap, worst, done = [], 1e9, False  # heap: (score, tokens) in order of insertion

        def add(tokens, total, length):  # BeamHypotheses.add
            nonlocal worst
            score = total / length ** lp
            if len(heap) < k or score > worst:
                heap.append((score, tokens))
                if len(heap) > k:
                    ranked = sorted((s, i) for i, (s, _) in enumerate(heap))
                    del heap[ranked[0][1]]
                    worst = ranked[1][0]
                else:
                    worst = min(score, worst)

        for cur in range(1, max_len):  # cur = prefix length, BOS counted
            logp = next_logprobs(b, [seq for seq, _ in beams])
            sums = logp + torch.tensor([s for _, s in beams], dtype=torch.float32)[:, None]  # float32, as HF
            V = sums.shape[1]
            flat = sums.flatten().tolist()
            order = sorted(range(len(flat)), key=lambda i: -flat[i])[: 2 * k]
            if "last_step" in changed and cur == max_len - 1:
                for rank, i in enumerate(order[:k]):  # EOS or max length: all k best stop here
                    add(beams[i // V][0] + [i % V], flat[i], cur)
                count("finalized")
                done = True
                break
            new = []
            for rank, i in enumerate(order):
                j, t, s = i // V, i % V, flat[i]
                if t == eos:
                    if rank >= k:
                        count("eos_dropped")
                        continue
                    add(beams[j][0] + [eos], s, cur)  # the score's length is the prefix's: no EOS
                    count("eos_added")
                else:
                    new.append((beams[j][0] + [t], s))
                if len(new) == k:
                    break
            beams = new
            best = new[0][1] if "done_test" in changed else flat[order[0]]
            if len(heap) == k and worst >= best / cur ** lp:
                done = True
                count("done")
                break
        if not done:  # finalize: the live beams, cut at max_len
            for seq, s in beams:
                add(seq, s, max_len)
            count("finalized")
        ranked = sorted(heap, key=lambda h: h[0])  # stable; pop() takes the last-added of equals
        results.append([(tokens, score) for score, tokens in (ranked.pop() for _ in range(num_return))])
    return results


def reference_tensors(results, max_len: int, pad: int):
    """reference_beam_search's lists as (tokens [B, n, L], scores [B, n]) in beam_search's layout."""
    L = max(len(t) for r in results for t, _ in r)
    tokens = torch.full((len(results), len(results[0]), L), pad, dtype=torch.long)
    scores = torch.zeros(len(results), len(results[0]))
    for b, r in enumerate(results):
        for j, (t, s) in enumerate(r):
            tokens[b, j, : len(t)] = torch.tensor(t)
            scores[b, j] = s
    return tokens, scores


@torch.no_grad()
def hf_generate(modules, feats: torch.Tensor, k: int, max_len: int, *, num_return: int | None = None,
                length_penalty: float = 1.0):
    """transformers' own beam search (`generate`, num_beams k, early_stopping False) on the official
    modules: an EncoderDecoderModel of the BertModel and GPT2LMHeadModel, given the encoder output
    of the bridged features. Returns (sequences [B, n, L], sequences_scores [B, n])."""
    from transformers import EncoderDecoderModel, GenerationConfig
    from transformers.modeling_outputs import BaseModelOutput

    _, bert, gpt2 = modules
    c = gpt2.config
    model = EncoderDecoderModel(encoder=bert, decoder=gpt2).eval()
    n = num_return or k
    gen = GenerationConfig(num_beams=k, num_return_sequences=n, max_length=max_len, length_penalty=length_penalty,
                           early_stopping=False, do_sample=False, decoder_start_token_id=c.bos_token_id,
                           bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                           output_scores=True, return_dict_in_generate=True, use_cache=True)
    out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hf_memory(modules, feats)),
                         generation_config=gen)
    B = feats.size(0)
    return out.sequences.view(B, n, -1), out.sequences_scores.view(B, n)
