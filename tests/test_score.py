"""`dico score` against independent references: pacscore's README figures for its own example, pycocoevalcap
called directly, CLIP-S/PAC-S recomputed the way pacscore's pac_score.py does (torchvision transform,
open_clip tokenizer, numpy), SciPy's kendalltau and the brute-force definitions of Kendall's tau."""
import json
import math
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from dico.clip_model import CLIP_MEAN, CLIP_STD
from dico.clip_weights import save_evaluator
from dico.demo.clip import build_tiny_clip, tiny_clip_config
from dico.metrics import coco
from dico.metrics.coco import coco_scores, ptb_tokenize_pairs
from dico.metrics.correlation import kendall
from dico.metrics.inputs import load_inputs, load_references
from dico.metrics.keys import COCO_SUITE, METRICS, TABLE_KEYS
from dico.metrics.score_files import score_files
from test_metrics import CANDS, REFS
from worlds import run_dico

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java")
PREFIX = "A photo depicts "

# pacscore's example/ files, byte for byte (aimagelab/pacscore bfbc488: example/*.json)
PACS_GOOD = ('{\n    "image1": "A white dog is laying on the ground with its head on its paws .",\n'
             '    "image2": "\'Two beige dogs are playing in the grass near a doghouse .\'"\n}')
PACS_BAD = ('{\n    "image1": "A child is preparing to slide down a piece of playground equipment .",\n'
            '    "image2": "A black horse is jumping in the grass ."\n    \n}')
PACS_REFS = ('{\n    "image1":\n    [\n'
             '        "A closeup of a white dog that is laying its head on its paws .",\n'
             '        "a large white dog lying on the floor .", \n'
             '        "A white dog has its head on the ground .",\n'
             '        "A white dog is resting its head on a tiled floor with its eyes open .",\n'
             '        "A white dog rests its head on the patio bricks ."\n    ],\n'
             '    "image2":\n    [\n'
             '        "a black dog jumping to catch a rope toy .",\n'
             '        "A black dog playing fetch with a ball of rope .", \n'
             '        "A black dog pounces to get a rope toy .",\n'
             '        "A black dog running after his rope toy .",\n'
             '        "A large black dog is playing in a grassy yard ."\n    ]\n}')
# pacscore README: `python -u compute_metrics.py [--candidates_json example/bad_captions.json]`
README_GOOD = {"BLEU-1": 0.6400, "BLEU-4": 0.3503, "METEOR": 0.3057, "ROUGE-L": 0.5012, "CIDEr": 1.4918}
README_BAD = {"BLEU-1": 0.4500, "BLEU-4": 0.0000, "METEOR": 0.0995, "ROUGE-L": 0.3268, "CIDEr": 0.4259}


def _image(path, seed, size=(64, 48)):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rng.randrange(size[0] - 10), rng.randrange(size[1] - 10)
        draw.ellipse([x, y, x + rng.randint(5, 20), y + rng.randint(5, 20)],
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """pacscore's example layout (example/{good,bad}_captions.json, refs.json, images/image{1,2}.jpg,
    generated JPEGs) and a random tiny CLIP saved in the OpenAI / PAC-S checkpoint layout."""
    root = tmp_path_factory.mktemp("score")
    ex = root / "example"
    ex.mkdir()
    (ex / "good_captions.json").write_text(PACS_GOOD)
    (ex / "bad_captions.json").write_text(PACS_BAD)
    (ex / "refs.json").write_text(PACS_REFS)
    for n in (1, 2):
        _image(ex / "images" / f"image{n}.jpg", n)
    cfg = tiny_clip_config(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                           text_width=64, text_layers=1, context_length=32)
    model = build_tiny_clip(cfg, seed=0).eval()
    with torch.no_grad():  # a random CLIP's image-text cosines are ~0 and mostly clamp to 0; sharing the
        # projection and an output bias between the towers makes them positive and varied
        model.visual.proj.copy_(model.text_projection)
        shared = torch.randn(64, generator=torch.Generator().manual_seed(1))
        model.visual.ln_post.bias.copy_(shared)
        model.ln_final.bias.copy_(shared)
    save_evaluator(model, root / "clip.pt")
    return {"root": root, "ex": ex, "model": model, "clip": root / "clip.pt"}


def pacscore_reference(model, images, cands, refs, w):
    """Per-caption (score, ref_score) as pacscore's pac_score.py computes them: its test transform, the
    prefixed candidates and references through the CLIP tokenizer (truncated), numpy cosines."""
    import open_clip
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    n_px, ctx = model.visual.image_size[0], model.context_length
    tf = Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px),
                  lambda im: im.convert("RGB"), ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(Image.open(p)) for p in images])).numpy()
        txt = model.encode_text(open_clip.tokenize([PREFIX + c for c in cands], context_length=ctx)).numpy()
        flat = [r for rs in refs for r in rs]
        ref = model.encode_text(open_clip.tokenize([PREFIX + r for r in flat], context_length=ctx)).numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    per = w * np.clip(np.sum(img * txt, axis=1), 0, None)
    owner = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
    best = np.array([np.max(txt[i] @ ref[owner == i].T) for i in range(len(refs))])
    return per, 2 * per * best / (per + best)


def pycocoevalcap_per_image(refs: list, cands: list):
    """Corpus and per-image BLEU / ROUGE-L / CIDEr / METEOR, pycocoevalcap called directly (two PTB runs)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in rs] for i, rs in enumerate(refs)})
    res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(cands)})
    corpus, per = {}, {}
    b, bs = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"BLEU-{n + 1}"], per[f"BLEU-{n + 1}"] = b[n], bs[n]
    corpus["ROUGE-L"], per["ROUGE-L"] = Rouge().compute_score(gts, res)
    corpus["CIDEr"], per["CIDEr"] = Cider().compute_score(gts, res)
    corpus["METEOR"], per["METEOR"] = Meteor().compute_score(gts, res)
    return corpus, {k: list(v) for k, v in per.items()}


# -- pacscore's example: the README's numbers ------------------------------------------------------
@needs_java
def test_pacscore_example_gives_the_numbers_of_its_readme(world, caplog, capsys, tmp_path):
    ex = world["ex"]
    for cands, want in (("good_captions.json", README_GOOD), ("bad_captions.json", README_BAD)):
        code, out, log = run_dico(caplog, "score", "--captions", ex / cands, "--refs", ex / "refs.json",
                                 "--metrics", "bleu,meteor,rouge,cider", "--out", tmp_path / "m.json", capsys=capsys)
        assert code == 0, log
        got = json.loads((tmp_path / "m.json").read_text())["metrics"]
        for k, v in want.items():
            assert round(got[k], 4) == v, (cands, k)
            assert f"{k:<9}  {v:>8.4f}" in out


# -- the COCO metrics equal pycocoevalcap -----------------------------------------------------------
@needs_java
def test_coco_scores_equal_pycocoevalcap_corpus_and_per_image():
    refs, cands = [REFS[i] for i in REFS], [CANDS[i] for i in REFS]
    want, want_per = pycocoevalcap_per_image(refs, cands)
    got, per, notes = coco_scores(dict(zip(REFS, refs)), dict(zip(REFS, cands)), ("bleu", "meteor", "rouge", "cider"))
    assert set(got) == set(want) and set(per) == set(want_per) and notes == {}
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
        assert per[k] == pytest.approx(want_per[k], abs=1e-9), k


@needs_java
def test_one_jvm_start_tokenises_references_and_candidates_alike(monkeypatch):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    want_refs = PTBTokenizer().tokenize({i: [{"caption": c} for c in rs] for i, rs in REFS.items()})
    want_cands = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in CANDS.items()})
    starts = []
    real = subprocess.Popen

    def popen(cmd, *a, **k):
        starts.append(cmd)
        return real(cmd, *a, **k)

    monkeypatch.setattr(subprocess, "Popen", popen)
    refs, cands = ptb_tokenize_pairs(REFS, CANDS)
    assert refs == want_refs and cands == want_cands
    assert len([c for c in starts if "edu.stanford.nlp.process.PTBTokenizer" in c]) == 1

    # ptb_prefetch: one JVM for many later calls (dico evaluate of several runs), the same tokens
    monkeypatch.setattr(coco, "_PTB_KNOWN", {})
    coco.ptb_prefetch([c for caps in REFS.values() for c in caps] + list(CANDS.values()))
    assert len([c for c in starts if "edu.stanford.nlp.process.PTBTokenizer" in c]) == 2
    assert ptb_tokenize_pairs(REFS, CANDS) == (want_refs, want_cands)
    assert len([c for c in starts if "edu.stanford.nlp.process.PTBTokenizer" in c]) == 2  # no JVM started
    other = {7: ["A caption nobody prefetched."]}
    assert coco.ptb_tokenize(other) == PTBTokenizer().tokenize({7: [{"caption": other[7][0]}]})


# -- input formats ----------------------------------------------------------------------------------
COCO_IDS = (391895, 522418, 184613)
CAPS = ["A man riding a motorcycle down a dirt road.", "A woman cutting a large white sheet cake.",
        "A boy herding cattle in a field."]
REFS3 = [["A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road.",
          "A man in a red shirt riding a motorcycle."],
         ["A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake.",
          "A lady cutting a cake with a knife."],
         ["A child holding a flowered umbrella and petting a yak.", "A young man holding an umbrella next to a herd of cattle.",
          "A boy and cattle in a grassy field."]]


def _coco_files(root):
    """The same three images and captions in every supported layout."""
    coco_name = [f"COCO_val2014_{i:012d}.jpg" for i in COCO_IDS]
    for n, name in enumerate(coco_name):
        _image(root / "val2014" / name, 10 + n)
    def write(name, obj):
        (root / name).write_text(json.dumps(obj))
        return root / name

    files = {
        "results": write("results.json", [{"image_id": i, "caption": c} for i, c in zip(COCO_IDS, CAPS)]),
        "results_str": write("results_str.json", [{"image_id": str(i), "caption": c} for i, c in zip(COCO_IDS, CAPS)]),
        "by_name": write("by_name.json", {n[:-4]: c for n, c in zip(coco_name, CAPS)}),
        "captions_val": write("captions_val2014.json", {
            "images": [{"id": i, "file_name": n} for i, n in zip(COCO_IDS, coco_name)],
            "annotations": [{"image_id": i, "id": 10 * i + k, "caption": r}
                            for i, rs in zip(COCO_IDS, REFS3) for k, r in enumerate(rs)]}),
        "karpathy": write("dataset_coco.json", {"images": [
            {"filepath": "val2014", "filename": n, "imgid": k, "cocoid": i, "split": "test",
             "sentences": [{"raw": r, "tokens": r.lower().split()} for r in rs]}
            for k, (i, n, rs) in enumerate(zip(COCO_IDS, coco_name, REFS3))] + [
            {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "imgid": 3, "cocoid": 9,
             "split": "train", "sentences": [{"raw": "A train image."}]},
            {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 4, "cocoid": 42,
             "split": "val", "sentences": [{"raw": "A val image."}]}]}),
        "pacs_refs": write("pacs_refs.json", {str(i): rs for i, rs in zip(COCO_IDS, REFS3)}),
    }
    from dico.data import normalise_karpathy

    normalise_karpathy(files["karpathy"], root, root / "splits.json")
    files["split_file"] = root / "splits.json"
    return files


@pytest.mark.parametrize("cands,refs,split,images", [
    ("results", "captions_val", None, "val2014"),        # COCO results + COCO annotations (file_name)
    ("results", "karpathy", "test", "."),                # Karpathy filepath/filename under --images
    ("results", "split_file", "test", None),             # our split file: its own image_root
    ("results_str", "karpathy", "test", "val2014"),      # string ids match integer cocoids
    ("by_name", "karpathy", "test", "val2014"),          # candidates named by image file name
    ("results", "pacs_refs", None, "val2014"),           # pacscore-style refs keyed "391895": COCO id lookup
], ids=["coco-annotations", "karpathy", "split-file", "string-ids", "file-names", "coco-id-lookup"])
def test_every_reference_format_gives_the_same_entries(tmp_path, cands, refs, split, images):
    files = _coco_files(tmp_path)
    entries, summary = load_inputs(files[cands], files[refs], split,
                                     tmp_path / images if images else (tmp_path if refs == "split_file" else None))
    assert [e.caption for e in entries] == CAPS
    assert [e.refs for e in entries] == REFS3
    assert [e.image.name for e in entries] == [f"COCO_val2014_{i:012d}.jpg" for i in COCO_IDS]
    ids = json.loads(files[cands].read_text())
    assert [e.id for e in entries] == ([d["image_id"] for d in ids] if isinstance(ids, list) else list(ids))
    assert summary["n_images"] == 3


def test_pacscore_layout_and_image_extensions(world, tmp_path):
    ex = world["ex"]
    entries, summary = load_inputs(ex / "good_captions.json", ex / "refs.json", None, ex / "images")
    assert [e.id for e in entries] == ["image1", "image2"] and summary["refs_format"] == "pacscore"
    assert [e.image.name for e in entries] == ["image1.jpg", "image2.jpg"]
    assert entries[1].caption == "'Two beige dogs are playing in the grass near a doghouse .'"
    imgs = tmp_path / "imgs"
    _image(imgs / "image1.png", 1)
    _image(imgs / "sub" / "image2.jpeg", 2)
    entries, _ = load_inputs(ex / "good_captions.json", ex / "refs.json", None, imgs)
    assert [e.image.relative_to(imgs).as_posix() for e in entries] == ["image1.png", "sub/image2.jpeg"]
    # COCO 2017 names (000000391895.jpg) by id
    files = _coco_files(tmp_path / "coco")
    for i in COCO_IDS:
        _image(tmp_path / "val2017" / f"{i:012d}.jpg", i)
    entries, _ = load_inputs(files["results"], files["pacs_refs"], None, tmp_path / "val2017")
    assert [e.image.name for e in entries] == [f"{i:012d}.jpg" for i in COCO_IDS]


def test_karpathy_split_selects_images(tmp_path):
    files = _coco_files(tmp_path)
    assert len(load_references(files["karpathy"], "test").refs) == 3
    assert list(load_references(files["karpathy"], "train").refs) == [9]
    assert len(load_references(files["karpathy"]).refs) == 5


@needs_java
def test_every_format_scores_the_same(tmp_path):
    files = _coco_files(tmp_path)
    want, _ = pycocoevalcap_per_image(REFS3, CAPS)
    for cands, refs, split in (("results", "captions_val", None), ("results", "karpathy", "test"),
                               ("by_name", "split_file", "test"), ("results_str", "pacs_refs", None)):
        got = score_files(files[cands], files[refs], split=split, metrics="bleu,rouge,cider")["metrics"]
        for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
            assert got[k] == pytest.approx(want[k], abs=1e-12), (cands, refs, k)


# -- metric subsets, CLIP-S / PAC-S ---------------------------------------------------------------
SUBSETS = {
    "bleu": {"BLEU-1", "BLEU-4"}, "cider": {"CIDEr"}, "rouge": {"ROUGE-L"}, "clip-s": {"CLIP-S"},
    "refclip-s": {"RefCLIP-S"}, "pac-s,refpac-s": {"PAC-S", "RefPAC-S"}, "bleu,pac-s": {"BLEU-1", "BLEU-4", "PAC-S"},
    "spice": set(),
}


@pytest.mark.parametrize("metrics", list(SUBSETS))
def test_each_metric_subset_computes_exactly_what_was_asked(world, metrics):
    if shutil.which("java") is None and any(m in metrics for m in COCO_SUITE):
        pytest.skip("no java")
    ex = world["ex"]
    run = dict(images=ex / "images", metrics=metrics, clip=world["clip"], pac=world["clip"])
    if metrics == "spice":  # asked for by name, and its jars are not here: an error before any work
        with pytest.raises(ValueError, match="--metrics spice needs the Stanford CoreNLP 3.6.0 jars: give their "
                                             "folder as --spice-jar-dir"):
            score_files(ex / "good_captions.json", ex / "refs.json", **run)
        r = score_files(ex / "good_captions.json", ex / "refs.json", **{**run, "metrics": None})  # every metric
        assert r["reasons"]["SPICE"].startswith("not computed (Stanford CoreNLP 3.6.0 jars missing); looked for")
        return
    r = score_files(ex / "good_captions.json", ex / "refs.json", **run)
    computed = {k for k, v in r["metrics"].items() if v is not None}
    assert computed == SUBSETS[metrics]
    asked = metrics.split(",")
    for k in set(TABLE_KEYS) - computed:
        if not any(k in METRICS[m] for m in asked):
            assert r["reasons"][k] == "not requested (--metrics)"


@pytest.mark.parametrize("workers", [0, 2])
def test_clip_s_and_pac_s_equal_the_pacscore_computation(world, workers):
    ex = world["ex"]
    r = score_files(ex / "good_captions.json", ex / "refs.json", images=ex / "images",
                      metrics="clip-s,refclip-s,pac-s,refpac-s", clip=world["clip"], pac=world["clip"],
                      workers=workers, batch_size=1)
    refs = json.loads(PACS_REFS)
    cands = json.loads(PACS_GOOD)
    images = [ex / "images" / f"{k}.jpg" for k in cands]
    for name, w in (("CLIP-S", 2.5), ("PAC-S", 2.0)):
        per, ref = pacscore_reference(world["model"], images, list(cands.values()), [refs[k] for k in cands], w)
        assert r["per_caption"][name] == pytest.approx(per.tolist(), abs=1e-5)
        assert r["per_caption"][f"Ref{name}"] == pytest.approx(ref.tolist(), abs=1e-5)
        assert per.min() > 0 and r["metrics"][name] == pytest.approx(per.mean(), abs=1e-5)
        assert r["metrics"][f"Ref{name}"] == pytest.approx(ref.mean(), abs=1e-5)


@needs_java
def test_default_runs_everything_that_can_run_and_says_why_not_the_rest(world, caplog, capsys, tmp_path):
    ex = world["ex"]
    code, out, log = run_dico(caplog, "score", "--captions", ex / "good_captions.json", "--refs", ex / "refs.json",
                             "--images", ex / "images", "--pac", world["clip"], "--out", tmp_path / "m.json",
                             "--per-caption", tmp_path / "s.csv", capsys=capsys)
    assert code == 0, log
    m = json.loads((tmp_path / "m.json").read_text())
    assert list(m["metrics"]) == list(TABLE_KEYS)          # the keys of the pipeline's metrics JSONs
    assert {k for k, v in m["metrics"].items() if v is None} == {"SPICE", "CLIP-S", "RefCLIP-S"}
    assert m["reasons"]["CLIP-S"] == "not computed: needs --clip PATH (OpenAI CLIP ViT-B/32 (ViT-B-32.pt) or ARCH:PRETRAINED)"
    for k, v in README_GOOD.items():
        assert round(m["metrics"][k], 4) == v
    assert m["provenance"]["git_commit"] and m["provenance"]["inputs"]["refs"]["sha256"]
    assert m["n_images"] == 2 and m["extra"]["BLEU-2"] > 0
    # stdout: the paper's column order, BLEU-1 first
    rows = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert rows == list(TABLE_KEYS)
    # --per-caption: one row per image, every metric with a per-image value
    import csv

    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [r["image_id"] for r in rows] == ["image1", "image2"]
    assert set(rows[0]) == {"image_id", "caption", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                            "CIDEr", "PAC-S", "RefPAC-S"}
    # PAC-S per image is float32 (CLIP's): the corpus value is their float32 mean, ~1e-8 from the float64 one
    assert np.mean([float(r["PAC-S"]) for r in rows]) == pytest.approx(m["metrics"]["PAC-S"], abs=1e-6)
    assert np.mean([float(r["ROUGE-L"]) for r in rows]) == pytest.approx(m["metrics"]["ROUGE-L"], abs=1e-9)


def test_without_java_the_coco_metrics_say_so(world, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    ex = world["ex"]
    r = score_files(ex / "good_captions.json", ex / "refs.json", images=ex / "images", pac=world["clip"])
    assert r["metrics"]["CIDEr"] is None and r["metrics"]["PAC-S"] is not None  # every metric that can run
    assert r["reasons"]["CIDEr"].startswith("not computed: Java not found on PATH")
    with pytest.raises(ValueError, match="--metrics cider needs Java on PATH"):  # asked for by name: an error
        score_files(ex / "good_captions.json", ex / "refs.json", metrics="cider,pac-s", images=ex / "images",
                    pac=world["clip"])


# -- errors a user can act on --------------------------------------------------------------------
def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("cands,refs,message", [
    ({"image1": "a dog", "image3": "a cat"}, None,
     r"cands.json: 1 of 2 candidates have no reference in .*refs.json \[pacscore\] \(first: 'image3'\)\. "
     r"Both files must name images the same way: its images are named like 'image1', 'image2'"),
    ([1, 2], None, r"cands.json: entry \[0\] is not an \{\"image_id\": int or str, \"caption\": str\} object"),
    ("7", None, r"cands.json: unknown candidates format \(a JSON int\); give a COCO results list"),
    ({"image1": ["a dog"]}, None, r"cands.json: entry 'image1' is a list, not a caption string \(a list: is this "
                                  r"the references file\? pass it as --refs\)"),
    ({"image1": "a dog"}, {"image1": "a dog"}, r"refs.json: unknown references format \(an object whose values are "
                                               r"not lists of captions \(is this the candidates file\?"),
    ({"image1": "a dog"}, {"image1": []}, r"refs.json: entry 'image1' needs a non-empty list of caption strings"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], None,
     r"cands.json: entry \[1\]: image_id 1 has a second caption; keep one caption per image"),
    ("not json", None, r"cands.json: not valid JSON"),
], ids=["candidate-without-reference", "not-objects", "unknown-candidates", "refs-as-candidates",
        "candidates-as-refs", "empty-refs", "duplicate", "not-json"])
def test_bad_inputs_name_the_file_the_entry_and_the_fix(world, tmp_path, caplog, capsys, cands, refs, message):
    c = _write(tmp_path / "cands.json", cands)
    r = _write(tmp_path / "refs.json", refs) if refs is not None else _write(tmp_path / "refs.json", PACS_REFS)
    code, _, log = run_dico(caplog, "score", "--captions", c, "--refs", r, "--metrics", "bleu", capsys=capsys)
    assert code == 1
    assert re.search(message, log), log


def test_reference_without_an_image(world, tmp_path, caplog, capsys):
    imgs = tmp_path / "imgs"
    _image(imgs / "image1.jpg", 1)
    code, _, log = run_dico(caplog, "score", "--captions", world["ex"] / "good_captions.json", "--refs",
                           world["ex"] / "refs.json", "--images", imgs, "--clip", world["clip"], capsys=capsys)
    assert code == 1
    assert "refs.json: image 'image2' (candidate 'image2') has no file under --images" in log
    assert "looked for image2.jpg/.png/..." in log and "--metrics bleu,meteor,rouge,cider,spice" in log


def test_image_that_will_not_decode(world, tmp_path, caplog, capsys):
    imgs = tmp_path / "imgs"
    _image(imgs / "image1.jpg", 1)
    (imgs / "image2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code, _, log = run_dico(caplog, "score", "--captions", world["ex"] / "good_captions.json", "--refs",
                           world["ex"] / "refs.json", "--images", imgs, "--metrics", "clip-s", "--clip", world["clip"], capsys=capsys)
    assert code == 1
    assert f"image {imgs / 'image2.jpg'} cannot be decoded" in log
    assert "replace the file, remove its entry from the candidates, or pass --skip-broken-images" in log


def test_two_files_for_one_image_name(world, tmp_path, caplog, capsys):
    imgs = tmp_path / "imgs"
    for name in ("image1.jpg", "image1.png", "image2.jpg"):
        _image(imgs / name, 1)
    code, _, log = run_dico(caplog, "score", "--captions", world["ex"] / "good_captions.json", "--refs",
                           world["ex"] / "refs.json", "--images", imgs, "--metrics", "clip-s", "--clip", world["clip"], capsys=capsys)
    assert code == 1 and "2 files match image 'image1'" in log and "keep one" in log


@pytest.mark.parametrize("argv,message", [
    (["--metrics", "bleu,clipscore"], "--metrics: unknown 'clipscore'; choose from bleu,meteor,rouge,cider,spice,"),
    (["--clip", "ViT-B-32:openai"], "--clip ViT-B-32:openai: the weights are not in the local cache, and dico "
                                    "score downloads nothing. Fetch them once on a machine with internet"),
    (["--clip", "ViT-B-99:openai"], "--clip ViT-B-99:openai: 'ViT-B-99' is not an open_clip model"),
    (["--clip", "ViT-B-32:nope"], "--clip ViT-B-32:nope: open_clip has no weights 'nope' for ViT-B-32 (it has: openai,"),
    (["--pac", "missing.pth"], "--pac missing.pth: no such file. Give a checkpoint path"),
    (["--correlation", "x.json", "--captions", "c.json"], "--correlation reads candidates, references and ratings"),
], ids=["unknown-metric", "not-cached", "unknown-arch", "unknown-tag", "missing-file", "correlation-and-captions"])
def test_bad_options(world, caplog, capsys, monkeypatch, tmp_path, argv, message):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # empty caches
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    ex = world["ex"]
    base = [] if "--correlation" in argv else ["--captions", ex / "good_captions.json", "--refs", ex / "refs.json"]
    code, _, log = run_dico(caplog, "score", *base, "--images", ex / "images", *argv, capsys=capsys)
    assert code == 1 and message in log, log


def test_pac_s_plus_plus_lora_checkpoint_is_refused(world, tmp_path, caplog, capsys):
    sd = torch.load(world["clip"], weights_only=True)["state_dict"]
    sd["transformer.resblocks.0.attn.q_proj.lora_A"] = torch.zeros(4, 64)
    torch.save({"state_dict": sd}, tmp_path / "PAC++_clip_ViT-B-32.pth")
    ex = world["ex"]
    code, _, log = run_dico(caplog, "score", "--captions", ex / "good_captions.json", "--refs", ex / "refs.json",
                           "--images", ex / "images", "--metrics", "pac-s", "--pac", tmp_path / "PAC++_clip_ViT-B-32.pth", capsys=capsys)
    assert code == 1 and "a PAC-S++ checkpoint (LoRA adapters), which dico score does not support" in log


# -- human correlation ----------------------------------------------------------------------------
def brute_force_tau(x, y):
    """Kendall's tau-b and tau-c (x100) by counting every pair (Kendall 1945; Stuart 1953)."""
    n, c, d, tx, ty = len(x), 0, 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            c += sx * sy > 0
            d += sx * sy < 0
            tx += sx == 0 and sy != 0
            ty += sy == 0 and sx != 0
    tau_b = (c - d) / math.sqrt((c + d + tx) * (c + d + ty))
    m = min(len(set(x)), len(set(y)))
    tau_c = 2 * (c - d) / (n * n * (m - 1) / m)
    return 100 * tau_b, 100 * tau_c


def test_kendall_equals_the_pair_counting_definitions():
    rng = random.Random(0)
    for _ in range(5):
        n = rng.randint(5, 60)
        x = [rng.choice([0.1, 0.2, 0.3, 0.5]) if rng.random() < 0.4 else rng.random() for _ in range(n)]
        y = [rng.choice([1.0, 2.0, 3.0, 4.0]) for _ in range(n)]
        t = kendall(x, y)
        b, c = brute_force_tau(x, y)
        assert t["tau_b"] == pytest.approx(b, abs=1e-9) and t["tau_c"] == pytest.approx(c, abs=1e-9)


def _flickr8k_file(root):
    """A flickr8k.json-style file (clipscore/pacscore layout): Expert-style triples of ratings, a NaN,
    irregular whitespace; image_path under Flicker8k_Dataset/ as in the real file."""
    rng = random.Random(1)
    words = "dog cat man woman boy girl runs jumps sits grass water beach ball red blue big small".split()
    data = {}
    for n in range(4):
        name = f"{1000 + n}_abc{n}.jpg"
        _image(root / "images" / name, 100 + n)
        refs = [" ".join(rng.choices(words, k=rng.randint(4, 9))) + " ." for _ in range(5)]
        judged = []
        for k in range(3):
            cap = " ".join(rng.choices(words, k=rng.randint(3, 8))) + ("  ." if k else " .")
            for _ in range(3):
                judged.append({"image_id": name[:-4], "image_path": f"Flicker8k_Dataset/{name}", "caption": cap,
                               "rating": float(rng.randint(1, 4))})
        if n == 0:
            judged[4]["rating"] = float("nan")
        data[name[:-4]] = {"human_judgement": judged, "image_id": name[:-4], "image_path": f"Flicker8k_Dataset/{name}",
                           "ground_truth": refs}
    (root / "flickr8k.json").write_text(json.dumps(data))  # NaN is written as NaN, as Python's json does
    return root / "flickr8k.json", data


@needs_java
def test_correlation_equals_scipy_on_independently_computed_scores(world, tmp_path, caplog, capsys):
    from scipy.stats import kendalltau

    path, data = _flickr8k_file(tmp_path)
    code, out, log = run_dico(caplog, "score", "--correlation", path, "--images", tmp_path / "images",
                             "--metrics", "bleu,meteor,rouge,cider,pac-s,refpac-s", "--pac", world["clip"],
                             "--out", tmp_path / "c.json", "--per-caption", tmp_path / "c.csv", capsys=capsys)
    assert code == 0, log
    got = json.loads((tmp_path / "c.json").read_text())
    # the reference: entries as pacscore's Flickr8k dataset builds them, scored by pycocoevalcap and
    # the pac_score.py computation, then SciPy
    entries = [(v["image_path"].split("/")[-1], [" ".join(g.split()) for g in v["ground_truth"]],
                " ".join(h["caption"].split()), h["rating"])
               for v in data.values() for h in v["human_judgement"] if not math.isnan(h["rating"])]
    assert got["n_judgements"] == len(entries) == 35 and got["n_nan_skipped"] == 1
    _, per = pycocoevalcap_per_image([e[1] for e in entries], [e[2] for e in entries])
    pac, refpac = pacscore_reference(world["model"], [tmp_path / "images" / e[0] for e in entries],
                                     [e[2] for e in entries], [e[1] for e in entries], 2.0)
    per["PAC-S"], per["RefPAC-S"] = pac, refpac
    human = [e[3] for e in entries]
    assert set(got["correlation"]) == set(per)
    for k, values in per.items():
        for variant in ("b", "c"):
            want = 100 * kendalltau(values, human, variant=variant)[0]
            assert got["correlation"][k][f"tau_{variant}"] == pytest.approx(want, abs=1e-6), (k, variant)
    assert "CIDEr" in out and "tau-b" in out and "35 judgements, 1 NaN ratings skipped" in out
    import csv

    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert [float(r["rating"]) for r in rows] == human and rows[0]["image"].endswith(entries[0][0])
    assert [float(r["CIDEr"]) for r in rows] == pytest.approx(per["CIDEr"], abs=1e-9)


def test_correlation_file_errors(tmp_path, caplog, capsys):
    bad = _write(tmp_path / "j.json", {"a": {"image_path": "x.jpg", "ground_truth": ["a dog"],
                                             "human_judgement": [{"caption": "a dog", "rating": "high"}]}})
    code, _, log = run_dico(caplog, "score", "--correlation", bad, "--metrics", "bleu", capsys=capsys)
    assert code == 1 and "j.json: entry 'a'.human_judgement[0]: rating 'high' is not a number" in log
    bad = _write(tmp_path / "j.json", [{"caption": "a dog"}])
    code, _, log = run_dico(caplog, "score", "--correlation", bad, capsys=capsys)
    assert code == 1 and "j.json: unknown human-judgement format; expected" in log
