"""The evaluator: one CLIP model used as feature backbone, reward model and metric.

Three uses (docs/fidelity.md rows 1, 12 and 26):
  1. its vision tower gives the captioner's frozen *grid features*: all 1+P tokens after the last
     transformer block, before ln_post and the projection (HF CLIPVisionModel.last_hidden_state);
  2. it is the reward model of fine-tuning: r = w·cos(E_I, E_T), no clamp, no prefix;
  3. it computes CLIP-S / RefCLIP-S (w = 2.5) and PAC-S / RefPAC-S (w = 2.0) with the prefix
     "A photo depicts " (CLIPScore, Hessel et al. 2021; pacscore evaluation/pac_score/pac_score.py).

On a cluster the weights are OpenAI CLIP (ViT-B/32, ViT-L/14) or the PAC-S checkpoints; in the demo
they are a tiny open_clip model trained on the demo data (`dico.demo_clip`). Both go through `load_evaluator`:
the demo model is saved in the PAC-S layout, {'state_dict': OpenAI-named weights}, which is the
same layout as `clip_ViT-B-32.pth`.

Everything here is built with `pretrained=None`; nothing touches a model hub.
"""
from __future__ import annotations

import logging
import re
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .io import torch_save

# CLIP's preprocessing constants (OpenAI CLIP, PAC-S and HF CLIPFeatureExtractor all use them)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # build_model_from_openai_state_dict infers heads = width // 64
PACS_PREFIX = "A photo depicts "

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


# -----------------------------------------------------------------------------
# preprocessing and tokenisation

def clip_preprocess(image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """PIL image -> [3, size, size], exactly the CLIP / PAC-S test transform:
    bicubic resize of the shortest side to `size`, center crop, RGB, [0,1], (x - mean) / std."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, size)
    x = TF.to_tensor(image.convert("RGB"))
    return TF.normalize(x, mean, std)


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """CLIP BPE ids [N, context_length]: SOT text EOT, zero-padded; a long text is truncated and its
    last kept position overwritten with EOT (the pooling reads the EOT position = argmax id)."""
    import open_clip

    return open_clip.tokenize(list(texts), context_length=context_length)


def _with_prefix(texts: Sequence[str], prefix: str) -> list[str]:
    # pacscore appends a space to a prefix that lacks one ('A photo depicts' -> 'A photo depicts ')
    if prefix and not prefix.endswith(" "):
        prefix += " "
    return [prefix + t for t in texts]


# -----------------------------------------------------------------------------
# the evaluator

class Evaluator:
    """A frozen open_clip CLIP with the three views DiCO needs: grid features, embeddings, scores."""

    def __init__(self, model: torch.nn.Module, name: str = ""):
        import open_clip

        self.model = model.eval().requires_grad_(False)
        self.name = name
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(model.context_length)
        self.embed_dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
        is_vit = hasattr(visual, "conv1") and hasattr(visual, "transformer")
        self.grid_width = int(visual.transformer.width) if is_vit else None
        pcfg = open_clip.get_model_preprocess_cfg(model)
        self.mean = tuple(pcfg.get("mean", CLIP_MEAN))
        self.std = tuple(pcfg.get("std", CLIP_STD))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device) -> "Evaluator":
        self.model.to(device)
        return self

    def preprocess(self, pil_image) -> torch.Tensor:
        return clip_preprocess(pil_image, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] -> [B, 1+P, W]: the vision transformer's output tokens before ln_post/proj.
        Same steps as open_clip's VisionTransformer.forward (_embeds, then transformer), stopping
        before _pool: patchify conv -> prepend class token -> + positions -> ln_pre -> blocks."""
        v = self.model.visual
        if self.grid_width is None or getattr(v, "attn_pool", None) is not None:
            raise ValueError(f"grid_features needs a plain ViT vision tower; {type(v).__name__} "
                             "of this evaluator is not one")
        x = v.conv1(pixels.to(self.device, self.dtype))        # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)                         # [B, P, W], row-major patches
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)                                   # identity in eval mode
        x = v.ln_pre(x)
        return v.transformer(x)                                  # batch-first in, batch-first out

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """[N,3,S,S] -> [N,D] L2-normalised (fp32), computed batch by batch on the model's device."""
        out = [self.model.encode_image(pixels[i:i + batch_size].to(self.device, self.dtype))
               for i in range(0, len(pixels), batch_size)]
        return _l2(out, self.embed_dim, self.device)

    @torch.no_grad()
    def embed_tokens(self, tokens: torch.Tensor, batch_size: int = 256, precision: str = "none") -> torch.Tensor:
        """CLIP token ids [N, context_length] -> [N,D] L2-normalised (fp32). `precision="fp16"` runs the
        text tower under fp16 autocast on a GPU (the official training reward's precision).

        A causal text tower (`text_tower_is_causal`: OpenAI CLIP, PAC-S) runs the texts shortest first in
        groups of at most `batch_size`, each on the positions up to its longest text's EOT
        (`encode_text_prefix`'s length groups): the same
        embeddings as `encode_text` on the full context up to float rounding, for a fraction of the
        work, since a caption fills ~15-20 of CLIP's 77 positions."""
        half = precision == "fp16" and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16, enabled=half):
            if not len(tokens):
                out = []
            elif text_tower_is_causal(self.model):  # length groups of at most batch_size texts
                out = [encode_text_prefix(self.model, tokens.to(self.device), buckets=-(-len(tokens) // batch_size))]
            else:
                out = [self.model.encode_text(tokens[i:i + batch_size].to(self.device))
                       for i in range(0, len(tokens), batch_size)]
        return _l2(out, self.embed_dim, self.device)

    def embed_texts(self, texts: Sequence[str], prefix: str = "", batch_size: int = 256) -> torch.Tensor:
        """prefix + text for each text -> [N,D] L2-normalised (fp32)."""
        texts = _with_prefix(texts, prefix)
        out = [self.embed_tokens(tokenize(texts[i:i + batch_size], self.context_length), batch_size)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)


def text_tower_is_causal(model) -> bool:
    """True when `model.encode_text` is an OpenAI-style text tower: causal self-attention (no position
    attends to a later one) pooled at the EOT token (the highest id). Then a text's embedding does not
    depend on the padding after its EOT, and `encode_text_prefix` may skip it."""
    return (getattr(model, "attn_mask", None) is not None and getattr(model, "text_pool_type", None) == "argmax"
            and all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")))


def encode_text_prefix(model, tokens: torch.Tensor, embed=None, buckets: int = 1) -> torch.Tensor:
    """`model.encode_text(tokens)` computed on the first L positions only, L = the last EOT + 1, for a
    model where `text_tower_is_causal` holds: the output at each text's EOT, where CLIP pools, does
    not depend on the padding after it, so the result equals the full pass up to float rounding
    (tests/test_evaluator.py checks it against open_clip's `encode_text`). `embed`: the token
    embedding to use instead of `model.token_embedding` (the demo's `CompactTokenTable`). `buckets` > 1:
    the texts sorted by length and cut into that many groups, each run on its own prefix (every text's
    output is a function of that text alone), so short texts do not pay for the longest one."""
    from open_clip.transformer import text_global_pool

    if buckets > 1 and len(tokens) >= buckets:  # shortest to longest, each bucket on its own prefix
        order = tokens.argmax(-1).argsort()
        out = torch.cat([encode_text_prefix(model, tokens[part], embed) for part in order.chunk(buckets)])
        return out[order.argsort()]
    length = int(tokens.argmax(-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()  # as open_clip's CLIP.encode_text
    x = (model.token_embedding if embed is None else embed)(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, model.text_pool_type)
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _l2(chunks: list[torch.Tensor], dim: int, device) -> torch.Tensor:
    # normalise in fp32 even when the towers ran under fp16 autocast
    if not chunks:
        return torch.zeros(0, dim, device=device)
    return F.normalize(torch.cat(chunks).float(), dim=-1)


# -----------------------------------------------------------------------------
# loading and saving

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


# -----------------------------------------------------------------------------
# scores

def clip_scores(image_embs: torch.Tensor, cand_embs: torch.Tensor, ref_embs=None, w: float = 2.5) -> dict:
    """Per-caption CLIP-S / PAC-S and, with references, RefCLIP-S / RefPAC-S (CLIPScore and pacscore's definitions).

        s   = w · max(cos(I, c), 0)                  (w = 2.5 CLIP-S, 2.0 PAC-S)
        t   = max_r cos(c, r)                        (raw: no clamp, no w, as in both official codes)
        ref = 2·s·t / (s + t)                        (harmonic mean)

    Guard: where s + t == 0 the official code divides 0/0 (or x/0) and returns NaN/inf, which then
    poisons the corpus mean; we return 0 there and the official value everywhere else (including
    its odd sign when t < 0, which real CLIP text-text cosines practically never reach).
    Embeddings must be L2-normalised; `ref_embs` is a list of [R_i, D] or a tensor [N, R, D].
    """
    s = w * (image_embs * cand_embs).sum(-1).clamp(min=0)
    out = {"score": s}
    if ref_embs is not None:
        t = max_ref_cosine(cand_embs, ref_embs)
        denom = s + t
        out["ref_score"] = torch.where(denom != 0, 2 * s * t / torch.where(denom != 0, denom, 1), 0.0)
    return out


def max_ref_cosine(cand_embs: torch.Tensor, ref_embs) -> torch.Tensor:
    """t_i = max_r cos(c_i, r) over the references of caption i (padded to a [N, R, D] batch)."""
    if isinstance(ref_embs, torch.Tensor):
        refs, mask = ref_embs, torch.ones(ref_embs.shape[:2], dtype=torch.bool, device=ref_embs.device)
    else:
        if any(len(r) == 0 for r in ref_embs):
            raise ValueError("every candidate needs at least one reference")
        refs = torch.nn.utils.rnn.pad_sequence(list(ref_embs), batch_first=True)
        lens = torch.tensor([len(r) for r in ref_embs], device=refs.device)
        mask = torch.arange(refs.shape[1], device=refs.device)[None] < lens[:, None]
    sims = torch.einsum("nd,nrd->nr", cand_embs, refs.to(cand_embs))
    return sims.masked_fill(~mask, float("-inf")).max(1).values


def reward_scores(image_embs: torch.Tensor, cand_embs: torch.Tensor, w: float = 2.0) -> torch.Tensor:
    """The training reward of the official DiCO code (official utils.py compute_clip_score): r = w · cos(I, c), with no
    clamp at 0 (and, in training, no prefix: the caller embeds with prefix='')."""
    return w * (image_embs * cand_embs).sum(-1)


def score_captions(evaluator: Evaluator, pixels_or_image_embs: torch.Tensor, candidates: list[str],
                   refs: list[list[str]] | None, *, w: float, prefix: str = PACS_PREFIX,
                   batch_size: int = 256, ref_embs: torch.Tensor | None = None) -> dict:
    """Corpus CLIP-S/PAC-S (mean over captions) and, with refs, RefCLIP-S/RefPAC-S, plus per-caption
    lists. Candidates and references get the same prefix (as pacscore does). `ref_embs`: the flat
    references' `embed_texts(..., prefix)` computed before (`reference_embeddings`), for references
    scored again and again (a validation set)."""
    x = pixels_or_image_embs
    img = evaluator.embed_images(x, batch_size) if x.dim() == 4 else F.normalize(x.float(), dim=-1)
    if len(img) != len(candidates):
        raise ValueError(f"{len(img)} images but {len(candidates)} candidate captions")
    cand = evaluator.embed_texts(candidates, prefix, batch_size)
    per_image = None
    if refs is not None:
        if len(refs) != len(candidates):
            raise ValueError(f"{len(refs)} reference lists but {len(candidates)} candidate captions")
        per_image = _per_image(evaluator, refs, prefix, batch_size, ref_embs)
    scores = clip_scores(img.to(cand.device), cand, per_image, w)
    out = {"score": scores["score"].mean().item(), "score_per_caption": scores["score"].tolist()}
    if "ref_score" in scores:
        out["ref_score"] = scores["ref_score"].mean().item()
        out["ref_score_per_caption"] = scores["ref_score"].tolist()
    return out


def reference_embeddings(evaluator: Evaluator, refs: list[list[str]], prefix: str = PACS_PREFIX,
                         batch_size: int = 256) -> torch.Tensor:
    """The references of every image, flattened in order, embedded with `prefix`: [sum of lens, D]."""
    return evaluator.embed_texts([r for rs in refs for r in rs], prefix, batch_size)


def _per_image(evaluator: Evaluator, refs: list[list[str]], prefix: str, batch_size: int,
               ref_embs: torch.Tensor | None) -> list[torch.Tensor]:
    """Each image's reference embeddings [R_i, D]: `ref_embs` (from `reference_embeddings`) or computed."""
    flat = reference_embeddings(evaluator, refs, prefix, batch_size) if ref_embs is None else ref_embs
    n = sum(len(rs) for rs in refs)
    if len(flat) != n:
        raise ValueError(f"{len(flat)} reference embeddings for {n} references")
    return list(flat.split([len(rs) for rs in refs]))


def score_captions_validation_form(evaluator: Evaluator, image_embs: torch.Tensor, candidates: list[str],
                                   refs: list[list[str]], *, w: float, batch_size: int = 256,
                                   ref_embs: torch.Tensor | None = None) -> dict:
    """CLIP-S / PAC-S and their Ref-variants as the official trainer computes them to select a
    checkpoint (official utils.py `clip_score_from_predictions` -> `compute_clip_score(ref=True)`):
    no text prefix, the candidate cosine NOT clamped, the best reference cosine clamped at 0,

        s = w * cos(I, c),   t = max(max_r cos(c, r), 0),   Ref = 2 s t / (s + t)

    (0 where s + t = 0). Unlike `score_captions` (the reported metrics' form) s may be negative.
    `ref_embs`: `reference_embeddings(evaluator, refs, "")` computed before."""
    img = F.normalize(image_embs.float(), dim=-1)
    if not (len(img) == len(candidates) == len(refs)):
        raise ValueError(f"{len(img)} images, {len(candidates)} candidates and {len(refs)} reference lists")
    cand = evaluator.embed_texts(candidates, "", batch_size)
    t = max_ref_cosine(cand, _per_image(evaluator, refs, "", batch_size, ref_embs)).clamp(min=0)
    s = w * (img.to(cand.device) * cand).sum(-1)
    denom = s + t
    ref = torch.where(denom != 0, 2 * s * t / torch.where(denom != 0, denom, 1), 0.0)
    return {"score": s.mean().item(), "ref_score": ref.mean().item(),
            "score_per_caption": s.tolist(), "ref_score_per_caption": ref.tolist()}
