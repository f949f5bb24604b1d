"""Tests of dico.clip_model, dico.clip_weights and dico.metrics.clipscore on tiny random CLIPs (no
pretrained weights exist offline)."""
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
from PIL import Image

from dico.data import ImageRecord
from dico.demo.clip import build_tiny_clip, tiny_clip_config, train_tiny_clip
from dico.clip_model import Evaluator
from dico.clip_weights import load_evaluator, save_evaluator
from dico.metrics.clipscore import clip_scores, reward_scores, score_captions

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notices

CFG = tiny_clip_config(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                       text_width=64, text_layers=1, context_length=16)
TEXTS = ["a red square", "a blue square on the left", "two green circles", ""]


@pytest.fixture(scope="module")
def model():
    return build_tiny_clip(CFG, seed=0)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def outputs(ev, pixels):
    return ev.embed_images(pixels), ev.embed_texts(TEXTS, prefix="A photo depicts "), ev.grid_features(pixels)


def assert_same(ev_a, ev_b, pixels):
    for a, b in zip(outputs(ev_a, pixels), outputs(ev_b, pixels)):
        assert torch.equal(a, b)


# -- loading and saving ---------------------------------------------------------------------------
def test_save_load_round_trip(model, pixels, tmp_path):
    path = tmp_path / "tiny.pth"
    save_evaluator(model, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict"}  # the PAC-S clip_ViT-B-32.pth layout
    ev = load_evaluator(path)
    assert not ev.model.training and not any(p.requires_grad for p in ev.model.parameters())
    assert (ev.image_size, ev.context_length, ev.embed_dim, ev.grid_width) == (32, 16, 32, 64)
    assert all(p.dtype == torch.float32 for p in ev.model.parameters())
    assert_same(Evaluator(model), ev, pixels)
    img, txt = ev.embed_images(pixels), ev.embed_texts(TEXTS[:3])
    ref = Evaluator(model)
    assert torch.equal(clip_scores(img, txt, None, 2.0)["score"],
                       clip_scores(ref.embed_images(pixels), ref.embed_texts(TEXTS[:3]), None, 2.0)["score"])


@pytest.mark.parametrize("layout", ["plain", "module", "wrapped_module", "torchscript"])
def test_openai_layouts(model, pixels, tmp_path, layout):
    path = tmp_path / f"{layout}.pt"
    sd = model.state_dict()
    if layout == "plain":
        torch.save(sd, path)
    elif layout == "module":
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    elif layout == "wrapped_module":
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        # open_clip's CLIP scripts cleanly and carries the OpenAI module names, like OpenAI's
        # released ViT-B-32.pt (whose state_dict also has extra non-weight entries: dropped)
        torch.jit.script(model.eval()).save(str(path))
    assert_same(Evaluator(model), load_evaluator(path, format="openai"), pixels)


def test_openai_load_assigns_the_weights_without_a_random_init_and_equals_open_clips_builder(model, pixels, tmp_path):
    """fp16 OpenAI-named weights (as in OpenAI's released files): the evaluator equals open_clip's own
    builder followed by an fp32 load (weights, causal mask, both towers), in fp32, and loading it draws
    nothing from torch's generator (no random initialisation that the weights then overwrite)."""
    from open_clip.model import build_model_from_openai_state_dict

    sd = {k: v.half() for k, v in model.state_dict().items()}
    path = tmp_path / "fp16.pt"
    torch.save(sd, path)
    rng = torch.get_rng_state()
    ev = load_evaluator(path, format="openai")
    assert torch.equal(torch.get_rng_state(), rng)
    ref = build_model_from_openai_state_dict(dict(sd), cast_dtype=None)
    ref.float().load_state_dict(sd)
    got, want = ev.model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert {t.dtype for t in got.values()} == {torch.float32} and not any(t.is_meta for t in got.values())
    assert torch.equal(ev.model.attn_mask, ref.attn_mask)
    assert_same(Evaluator(ref), ev, pixels)


def _register(tmp_path, name, cfg):
    d = tmp_path / "cfgs"
    d.mkdir(exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)


def test_open_clip_format(pixels, tmp_path):
    cfg = {k: v for k, v in CFG.items() if k != "quick_gelu"}  # GELU: an OpenCLIP-style model
    _register(tmp_path, "Dico-Test-Tiny", cfg)
    torch.manual_seed(0)
    m = open_clip.create_model("Dico-Test-Tiny", pretrained=None)
    path = tmp_path / "oc.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, path)
    ev = load_evaluator(path, format="open_clip", arch="Dico-Test-Tiny")
    assert_same(Evaluator(m), ev, pixels)


def test_format_mismatch_messages(model, tmp_path):
    custom = dict(CFG, custom_text=True)  # CustomTextCLIP: text tower under 'text.'
    _register(tmp_path, "Dico-Test-Custom", custom)
    m = open_clip.create_model("Dico-Test-Custom", pretrained=None)
    oc_path = tmp_path / "custom.pth"
    torch.save(m.state_dict(), oc_path)
    with pytest.raises(ValueError) as e:
        load_evaluator(oc_path, format="openai")
    msg = str(e.value)
    assert str(oc_path) in msg and "format='openai'" in msg and "format='open_clip'" in msg
    assert "text_projection" in msg  # a missing key is named

    oa_path = tmp_path / "openai.pth"
    save_evaluator(model, oa_path)
    with pytest.raises(ValueError) as e:
        load_evaluator(oa_path, format="open_clip", arch="Dico-Test-Custom")
    msg = str(e.value)
    assert str(oa_path) in msg and "arch='Dico-Test-Custom'" in msg and "format='openai'" in msg
    assert "Missing keys" in msg and "Unexpected keys" in msg

    # same names, other shapes: context 32 instead of 16
    _register(tmp_path, "Dico-Test-Ctx32", dict(CFG, text_cfg=dict(CFG["text_cfg"], context_length=32)))
    with pytest.raises(ValueError, match="Shape mismatches.*positional_embedding"):
        load_evaluator(oa_path, format="open_clip", arch="Dico-Test-Ctx32")
    with pytest.raises(ValueError, match="not an open_clip model config"):
        load_evaluator(oa_path, format="open_clip", arch="No-Such-Arch")
    with pytest.raises(ValueError, match="needs arch"):
        load_evaluator(oa_path, format="open_clip")

    # OpenAI names with extra weights (e.g. LoRA adapters) -> the unexpected keys are listed
    sd = dict(model.state_dict(), **{"visual.lora_A": torch.zeros(2)})
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"Unexpected keys: visual\.lora_A"):
        load_evaluator(tmp_path / "extra.pth")


def test_broken_files(model, tmp_path):
    good = tmp_path / "good.pth"
    save_evaluator(model, good)
    data = good.read_bytes()
    for name, blob in [("truncated.pth", data[: len(data) // 2]), ("garbage.pth", b"not a checkpoint")]:
        bad = tmp_path / name
        bad.write_bytes(blob)
        for fmt, arch in [("openai", None), ("open_clip", "ViT-B-32")]:
            with pytest.raises(ValueError) as e:
                load_evaluator(bad, format=fmt, arch=arch)
            msg = str(e.value)
            assert str(bad) in msg and "truncated or corrupt" in msg and f"format='{fmt}'" in msg
    with pytest.raises(FileNotFoundError, match="missing.pth.*format='openai'"):
        load_evaluator(tmp_path / "missing.pth")
    import argparse
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "ns.pth")
    with pytest.raises(ValueError, match="argparse.Namespace.*weights_only"):
        load_evaluator(tmp_path / "ns.pth")
    torch.save({"state_dict": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_evaluator(tmp_path / "list.pth")


def test_save_rejects_non_openai_layouts(tmp_path):
    with pytest.raises(ValueError, match="multiple of 64"):
        tiny_clip_config(32, 32, 8, 96, 1, 64, 1, 16)
    bad = dict(CFG, vision_cfg=dict(CFG["vision_cfg"], head_width=32))  # 2 heads of 32
    with pytest.raises(ValueError, match="heads"):
        save_evaluator(build_tiny_clip(bad, 0), tmp_path / "x.pth")
    gelu = dict(CFG, quick_gelu=False)
    with pytest.raises(ValueError, match="QuickGELU"):
        save_evaluator(build_tiny_clip(gelu, 0), tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


# -- features and preprocessing -------------------------------------------------------------------
def test_grid_features_match_open_clip(model, pixels):
    ev = Evaluator(model)
    grid = ev.grid_features(pixels)
    assert grid.shape == (3, 1 + (32 // 8) ** 2, 64)
    seen = {}

    def grab(module, args, out):  # returns None: a forward hook's return value replaces the output
        seen["x"] = args[0]

    hook = model.visual.ln_post.register_forward_hook(grab)
    try:
        pooled = model.encode_image(pixels)
    finally:
        hook.remove()
    assert torch.allclose(grid, seen["x"], atol=1e-6)
    v = model.visual
    assert torch.allclose(v.ln_post(grid[:, 0]) @ v.proj, pooled, atol=1e-5)
    assert torch.allclose(ev.embed_images(pixels), F.normalize(pooled, dim=-1), atol=1e-6)


def test_preprocess_matches_clip_transform(model):
    img = Image.fromarray(torch.randint(0, 255, (50, 40, 3), dtype=torch.uint8).numpy()).convert("RGBA")
    x = Evaluator(model).preprocess(img)
    ref = open_clip.image_transform(32, is_train=False)(img)  # bicubic shortest side, crop, CLIP norm
    assert x.shape == (3, 32, 32) and torch.allclose(x, ref, atol=1e-6)


def test_text_batching_and_truncation(model):
    ev = Evaluator(model)
    long = " ".join(["word"] * 40)  # > 16 tokens: truncated with EOT kept last
    texts = TEXTS + [long]
    assert torch.allclose(ev.embed_texts(texts, batch_size=2), ev.embed_texts(texts), atol=1e-6)
    tok = open_clip.tokenize([long], context_length=16)
    assert tok[0, -1].item() == 49407
    assert torch.allclose(ev.embed_texts([long]), F.normalize(model.encode_text(tok), dim=-1), atol=1e-6)


def _lengths_seen(model):
    """Record the sequence length of every batch the text transformer runs on."""
    seen = []
    handle = model.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    return seen, handle


def test_embed_tokens_runs_each_batch_up_to_its_longest_eot_and_equals_open_clip():
    """Against open_clip's own `encode_text` on the full context: texts of every length (one truncated
    with its EOT kept last), unsorted, in batches of 2: the same embeddings, each back in its row, while
    the text tower ran shortest first and each batch only up to its longest EOT."""
    model = build_tiny_clip(CFG, 0)
    ev = Evaluator(model)
    texts = ["a large blue square to the left of a small green triangle", "a red circle", "",
             " ".join(["word"] * 40), "two shapes: a box and a disk", "a circle", "there is a tiny yellow diamond"]
    tokens = open_clip.tokenize(texts, context_length=16)
    eot = tokens.argmax(-1) + 1
    want = F.normalize(model.encode_text(tokens), dim=-1)
    seen, handle = _lengths_seen(model)
    try:
        got = ev.embed_tokens(tokens, batch_size=2)
    finally:
        handle.remove()
    assert torch.allclose(got, want, atol=1e-5)
    assert seen == [int(b.max()) for b in eot.sort().values.split(2)]  # shortest first, each to its EOT
    assert seen[0] < 16  # padding was skipped


def test_embed_tokens_keeps_the_full_context_for_a_text_tower_that_is_not_causal_at_eot():
    """A tower pooled at the last position (or without the causal mask) sees the padding: there the
    prefix would be wrong, so the full context runs."""
    model = copy.deepcopy(build_tiny_clip(CFG, 0))
    model.text_pool_type = "last"
    tokens = open_clip.tokenize(["a red circle", "two green circles and a square"], context_length=16)
    seen, handle = _lengths_seen(model)
    try:
        got = Evaluator(model).embed_tokens(tokens)
    finally:
        handle.remove()
    assert torch.allclose(got, F.normalize(model.encode_text(tokens), dim=-1), atol=1e-6)
    assert seen == [16]


# -- scores ---------------------------------------------------------------------------------------
def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("w", [2.5, 2.0])
def test_clip_scores_official_formulas(w):
    n, d = 12, 4  # low dimension: plenty of negative cosines
    img, cand = torch.randn(n, d), torch.randn(n, d)
    refs = [torch.randn(r, d) for r in [1, 3, 5, 2] * 3]
    got = clip_scores(F.normalize(img, dim=-1), F.normalize(cand, dim=-1),
                      [F.normalize(r, dim=-1) for r in refs], w)
    for i in range(n):
        cos = float(img[i] @ cand[i] / (img[i].norm() * cand[i].norm()))
        s = w * max(cos, 0.0)
        t = max(float(cand[i] @ r / (cand[i].norm() * r.norm())) for r in refs[i])
        assert got["score"][i].item() == pytest.approx(s, abs=1e-5)
        assert got["ref_score"][i].item() == pytest.approx(2 * s * t / (s + t) if s + t else 0.0, abs=1e-5)
    assert (got["score"] == 0).any()  # the clamp was exercised
    raw = reward_scores(F.normalize(img, dim=-1), F.normalize(cand, dim=-1), w)
    assert (raw < 0).any() and torch.allclose(raw.clamp(min=0), got["score"], atol=1e-6)
    assert "ref_score" not in clip_scores(F.normalize(img, dim=-1), F.normalize(cand, dim=-1), None, w)


def test_ref_score_guard_and_tensor_refs():
    e = torch.eye(4)
    # cos(img, cand) = 0 -> s = 0, and the only ref is orthogonal -> t = 0: official 0/0 = NaN, here 0
    out = clip_scores(e[:1], e[1:2], [e[2:3]], 2.0)
    assert out["ref_score"].item() == 0.0
    refs = _unit(5, 3, 8, seed=3)
    img, cand = _unit(5, 8, seed=4), _unit(5, 8, seed=5)
    assert torch.allclose(clip_scores(img, cand, refs, 2.0)["ref_score"],
                          clip_scores(img, cand, list(refs), 2.0)["ref_score"])


def test_score_captions_applies_prefix(model, pixels):
    ev = Evaluator(model)
    cands = ["a red square", "a dog", "two cats"]
    refs = [["a red box", "red"], ["a puppy"], ["cats", "two kittens", "pets"]]
    out = score_captions(ev, pixels, cands, refs, w=2.0)
    img = ev.embed_images(pixels)
    c = ev.embed_texts(["A photo depicts " + x for x in cands])
    r = [ev.embed_texts(["A photo depicts " + x for x in rs]) for rs in refs]
    want = clip_scores(img, c, r, 2.0)
    assert out["score_per_caption"] == pytest.approx(want["score"].tolist(), abs=1e-6)
    assert out["ref_score_per_caption"] == pytest.approx(want["ref_score"].tolist(), abs=1e-6)
    assert out["score"] == pytest.approx(want["score"].mean().item(), abs=1e-6)
    # pacscore adds the missing space after a prefix; precomputed image embeddings work too
    again = score_captions(ev, img, cands, None, w=2.0, prefix="A photo depicts")
    assert again["score"] == pytest.approx(out["score"], abs=1e-6) and "ref_score" not in again
    plain = score_captions(ev, img, cands, None, w=2.0, prefix="")
    want_plain = clip_scores(img, ev.embed_texts(cands), None, 2.0)["score"]
    assert plain["score_per_caption"] == pytest.approx(want_plain.tolist(), abs=1e-6)


# -- training -------------------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 40, 170), "orange": (250, 140, 20)}
TEMPLATES = ["a {} square", "a {} image", "something {}", "the colour {}", "a plain {} picture"]


def _colour_records(tmp_path, n_per_colour=8):
    records, g = [], torch.Generator().manual_seed(0)
    for ci, (name, rgb) in enumerate(COLOURS.items()):
        for k in range(n_per_colour):
            jitter = torch.randint(-15, 16, (3,), generator=g).tolist()
            path = tmp_path / f"{name}_{k}.png"
            Image.new("RGB", (36, 32), tuple(min(255, max(0, c + j)) for c, j in zip(rgb, jitter))).save(path)
            records.append(ImageRecord(ci * 100 + k, path, tuple(t.format(name) for t in TEMPLATES)))
    return records


def _swap_colour(caption, rng):
    for name in COLOURS:
        if name in caption:
            return caption.replace(name, rng.choice([c for c in COLOURS if c != name]))
    return None


def test_train_tiny_clip(tmp_path):
    records = _colour_records(tmp_path)
    logs = []
    stats = train_tiny_clip(records, CFG, tmp_path / "tiny.pth", steps=80, batch_size=32, lr=2e-3, seed=0,
                            hard_negative_fn=_swap_colour, log=logs.append, eval_records=records[::8])
    assert stats["final_loss"] < 0.7 * stats["first_loss"], stats
    assert any("step 1/80" in line for line in logs) and any("step 80/80" in line for line in logs)
    ev = load_evaluator(tmp_path / "tiny.pth")
    pix = torch.stack([ev.preprocess(Image.open(r.path)) for r in records])
    names = list(COLOURS)
    match = [r.captions[0] for r in records]
    mismatch = [TEMPLATES[0].format(names[(names.index(r.captions[0].split()[1]) + 1) % 8]) for r in records]
    good = score_captions(ev, pix, match, None, w=2.0)["score_per_caption"]
    bad = score_captions(ev, pix, mismatch, None, w=2.0)["score_per_caption"]
    print(f"tiny CLIP: matching {sum(good) / len(good):.3f} vs mismatched {sum(bad) / len(bad):.3f}", stats)
    assert sum(good) / len(good) > sum(bad) / len(bad) + 0.05, (sum(good), sum(bad))
    assert sum(g > b for g, b in zip(good, bad)) > 0.75 * len(good)
    assert stats["train"]["i2t_r1"] > 0.3 and 0 <= stats["val"]["i2t_r1"] <= 1 and 0 <= stats["val"]["t2i_r1"] <= 1


def test_train_tiny_clip_is_deterministic(tmp_path):
    records = _colour_records(tmp_path, n_per_colour=2)
    sds = []
    for run in range(2):
        train_tiny_clip(records, CFG, tmp_path / f"r{run}.pth", steps=3, batch_size=8, lr=1e-3, seed=7,
                        hard_negative_fn=_swap_colour, log=lambda s: None)
        sds.append(torch.load(tmp_path / f"r{run}.pth", weights_only=True)["state_dict"])
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_compact_token_table_trains_the_dense_table_adamw_would():
    """CompactTokenTable + write_back against torch's AdamW on the full table (the reference)."""
    from dico.demo.clip import CompactTokenTable

    torch.manual_seed(0)
    full_ref = torch.nn.Embedding(300, 8)
    full = torch.nn.Embedding(300, 8)
    full.load_state_dict(full_ref.state_dict())
    used = torch.tensor([3, 17, 17, 42, 299, 5])
    table = CompactTokenTable(full, used)
    head = torch.nn.Linear(8, 1)
    head_ref = copy.deepcopy(head)
    opt_ref = torch.optim.AdamW([full_ref.weight, *head_ref.parameters()], lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW([table.weight, *head.parameters()], lr=1e-2, weight_decay=0.1)
    for step in range(25):
        lr = 1e-2 * (step + 1) / 25
        for o in (opt_ref, opt):
            o.param_groups[0]["lr"] = lr
        tokens = used[torch.randint(len(used), (4, 3))]
        for emb, h, o in ((full_ref, head_ref, opt_ref), (table, head, opt)):
            o.zero_grad()
            h(emb(tokens)).pow(2).mean().backward()
            o.step()
        table.decay *= 1 - lr * 0.1
    table.write_back(full)
    assert torch.allclose(full.weight, full_ref.weight, atol=1e-6, rtol=1e-5)
    assert not torch.equal(full_ref.weight[0], full_ref.weight[0] / table.decay)  # unused rows did decay
    with pytest.raises(ValueError, match="not in the compact token table"):
        table(torch.tensor([[4]]))


def test_text_prefix_equals_the_full_text_tower():
    from dico.clip_model import encode_text_prefix, tokenize

    model = build_tiny_clip(CFG, 0).eval()
    tokens = tokenize(["a red circle", "a large blue square to the left of a small green triangle"],
                      CFG["text_cfg"]["context_length"])
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # there is padding to skip
    with torch.no_grad():
        assert torch.allclose(encode_text_prefix(model, tokens), model.encode_text(tokens), atol=1e-5)
    # in length groups (demo_clip.TEXT_BUCKETS): each text's row back in its place, lengths unsorted
    texts = ["a large blue square to the left of a small green triangle on a grey background", "a red circle",
             "two shapes: a blue box and a red disk", "there is a tiny yellow diamond", "a circle",
             "a picture of a big green triangle in the top left", "three shapes: a red box, a blue disk and a green rhombus"]
    tokens = tokenize(texts, CFG["text_cfg"]["context_length"])
    with torch.no_grad():
        full = model.encode_text(tokens)
        for buckets in (2, 3, 4):
            assert torch.allclose(encode_text_prefix(model, tokens, buckets=buckets), full, atol=1e-5), buckets


def test_retrieval_r1_both_ways_against_a_loop():
    from dico.demo.retrieval import retrieval

    class Fixed:  # embeddings given, so the ranking is known
        def __init__(self, imgs, txts):
            self.imgs, self.txts = imgs, txts

        def embed_images(self, pixels):
            return self.imgs

        def embed_texts(self, texts):
            return self.txts

    torch.manual_seed(1)
    captions = [["a", "b"], ["c", "a"], ["d", "e"]]  # "a" describes images 0 and 1
    imgs, txts = torch.randn(3, 4), torch.randn(6, 4)
    got = retrieval(Fixed(imgs, txts), None, captions)
    flat = [c for cs in captions for c in cs]
    sims = imgs @ txts.T
    i2t = sum(flat[max(range(6), key=lambda j: sims[i, j])] in captions[i] for i in range(3)) / 3
    t2i = sum(flat[j] in captions[max(range(3), key=lambda i: sims[i, j])] for j in range(6)) / 6
    assert (got["i2t_r1"], got["t2i_r1"]) == (i2t, t2i) == (got["i2t_r1_refs"], got["t2i_r1_refs"])
    assert got["hits"] == "reference texts"


def test_retrieval_counts_a_caption_true_of_another_scene_as_a_hit():
    """Two scenes of one big red circle (on white, on grey): "there is a big red circle" (scene 0's) is
    true of both, so retrieving scene 1 is a hit by truth (`demo.describes`) and a miss by reference text;
    "a red square" retrieving scene 0 is a miss either way."""
    from dico.demo import Scene, Shape
    from dico.demo.retrieval import retrieval

    class Fixed:
        def embed_images(self, pixels):
            return torch.eye(3)

        def embed_texts(self, texts):  # each text's most similar image, by hand
            return torch.eye(3)[[1, 0, 1, 0, 2, 2]]

    red = Shape("red", "circle", "large", 0.5, 0.5)
    scenes = [Scene("white", (red,)), Scene("grey", (red,)), Scene("white", (Shape("red", "square", "small", 0.5, 0.5),))]
    captions = [["there is a big red circle", "a red circle on a white background"],
                ["a single red circle against a grey background", "a red square"],
                ["a small red box", "a red square in the center"]]
    by_text = retrieval(Fixed(), None, captions)
    by_truth = retrieval(Fixed(), None, captions, scenes)
    # texts -> images 1, 0, 1, 0, 2, 2: scene 0's first caption lands on scene 1 (true of it), its
    # second on scene 0; scene 1's first on 1, "a red square" on 0 (wrong); scene 2's two on 2
    assert by_text["t2i_r1"] == 4 / 6 and by_truth["t2i_r1"] == 5 / 6
    assert by_truth["t2i_r1_refs"] == by_text["t2i_r1"] and by_truth["hits"] == "captions true of the scene"
    # images -> their top text: image 0 -> text 1 (its own), 1 -> text 0 (true of it), 2 -> text 4
    assert by_text["i2t_r1"] == 2 / 3 and by_truth["i2t_r1"] == 1.0


def test_preprocess_all_is_clip_preprocess_bit_for_bit():
    """The batched path (images already at the input size) against the reference transform, one image
    at a time; other sizes and modes fall back to it."""
    from dico.demo.clip import preprocess_all
    from dico.clip_model import clip_preprocess

    g = torch.Generator().manual_seed(0)
    square = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g).numpy())
              for _ in range(5)]
    want = torch.stack([clip_preprocess(im, 32) for im in square])
    assert torch.equal(preprocess_all(square, 32), want)
    mixed = square + [square[0].resize((40, 36)), square[1].convert("RGBA")]
    assert torch.equal(preprocess_all(mixed, 32), torch.stack([clip_preprocess(im, 32) for im in mixed]))


def test_train_tiny_clip_starts_from_init_state_and_uses_extra_pairs(tmp_path):
    """`init_state`: the run continues from those weights (a near-zero learning rate leaves them as they
    were, while a run from random weights is far from them); `extra_pairs` join the pool (their count is
    in the stats, and the R@1 of the first 512 images is still over the train records)."""
    records = _colour_records(tmp_path, n_per_colour=2)
    first = train_tiny_clip(records, CFG, tmp_path / "a.pth", steps=2, batch_size=8, lr=1e-3, seed=3, log=lambda s: None)
    init = torch.load(tmp_path / "a.pth", weights_only=True)["state_dict"]
    extra = [(Image.open(r.path).convert("RGB"), list(r.captions)) for r in records[:4]]
    stats = train_tiny_clip(records, CFG, tmp_path / "b.pth", steps=1, batch_size=8, lr=1e-12, seed=4,
                            log=lambda s: None, init_state=init, extra_pairs=extra)
    cont = torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]
    assert all(torch.allclose(cont[k], init[k], atol=1e-6) for k in init)
    assert stats["n_images"] == len(records) + 4 and stats["n_pretraining_images"] == 4
    assert first["n_pretraining_images"] == 0
    train_tiny_clip(records, CFG, tmp_path / "c.pth", steps=1, batch_size=8, lr=1e-12, seed=4, log=lambda s: None)
    fresh = torch.load(tmp_path / "c.pth", weights_only=True)["state_dict"]
    assert not torch.allclose(fresh["visual.conv1.weight"], init["visual.conv1.weight"], atol=1e-3)


def test_temperature_lr_scale_multiplies_the_logit_scales_step_only(tmp_path):
    """AdamW's first step moves a parameter by lr * g / (|g| + eps), i.e. by the lr (sign of the gradient):
    the logit scale moves by temperature_lr_scale x lr, every other weight exactly as with scale 1."""
    import math

    records = _colour_records(tmp_path, n_per_colour=2)
    lr, init = 1e-3, math.log(1 / 0.07)  # open_clip's initial logit scale
    out = {}
    for scale in (1.0, 30.0):
        stats = train_tiny_clip(records, CFG, tmp_path / f"t{scale}.pth", steps=1, batch_size=8, lr=lr, seed=5,
                                warmup=1, log=lambda s: None, temperature_lr_scale=scale)
        out[scale] = torch.load(tmp_path / f"t{scale}.pth", weights_only=True)["state_dict"]
        assert stats["temperature_lr_scale"] == scale
        assert abs(out[scale]["logit_scale"].item() - init) == pytest.approx(scale * lr, rel=1e-3)
    assert all(torch.equal(out[1.0][k], out[30.0][k]) for k in out[1.0] if k != "logit_scale")
