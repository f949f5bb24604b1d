"""dico.metrics: the COCO suite equals pycocoevalcap called directly; SPICE/Java failures are explained."""
import shutil

import pytest

from dico.metrics import coco
from dico.metrics.coco import coco_scores, find_spice_jars
from dico.metrics.diversity import diversity
from dico.metrics.keys import COCO_KEYS
from dico.metrics.scoring import compute

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java")

REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person surfing on a big wave.", "Man on a surfboard riding a wave.", "A surfer in the ocean."],
    2: ["Two dogs playing with a frisbee in the park.", "Dogs running on the grass.",
        "Two brown dogs chase a frisbee.", "A pair of dogs play on a lawn."],
    3: ["A plate of food with broccoli and rice.", "Rice, chicken and broccoli on a white plate.",
        "A healthy meal on a plate.", "Food served on a dish.", "A dinner plate with vegetables.",
        "Broccoli next to rice."],
    "img4": ["A red double-decker bus on a city street.", "A bus driving down the road.",
             "The red bus is parked by the curb."],
    (5, "b"): ["A cat sleeping on a couch.", "A cat isn't awake; it's lying on the sofa.",
               "A grey cat curled up on a couch."],
    6: ["A kitchen with a stove and a refrigerator.", "A small kitchen with white cabinets.",
        "An oven in a kitchen."],
    7: ["A baseball player swinging a bat.", "A batter at home plate.", "A man hits a baseball.",
        "A baseball game in progress.", "Player swings at the pitch.", "Catcher and batter at a game.",
        "A baseball player is at bat."],
    8: ["A giraffe standing next to a tree.", "A tall giraffe eating leaves."],
    9: ["People walking on a beach with umbrellas.", "A crowded beach on a sunny day.",
        "Umbrellas on the sand near the sea."],
    10: ["A laptop computer on a desk.", "A desk with a laptop and a mouse.", "An open laptop on a table."],
}
CANDS = {1: "A man riding a wave on a surfboard.", 2: "Two dogs playing with a frisbee.",
         3: "A plate of food with broccoli.", "img4": "A red bus on a street.",
         (5, "b"): "A cat laying on a couch.", 6: "A kitchen with a stove.", 7: "A baseball player swinging a bat.",
         8: "A giraffe standing in a field.", 9: "", 10: "A laptop laptop on a desk desk."}


def pycocoevalcap_direct(refs, cands, meteor):
    """What the COCO scorers give when called directly, pycocoevalcap-style."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in refs.items()})
    res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in cands.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n}": b for n, b in enumerate(bleu, 1)}
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor:
        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    return out


@needs_java
def test_coco_scores_equal_pycocoevalcap_with_meteor():  # ~30 s: two METEOR JVMs
    got, per, notes = coco_scores(REFS, CANDS)
    want = pycocoevalcap_direct(REFS, CANDS, meteor=True)
    assert list(got) == [k for k in COCO_KEYS if k != "SPICE"]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
        assert len(per[key]) == len(CANDS)
    assert 0.5 < got["CIDEr"] < 5.0  # raw scale, not x100
    assert "SPICE" not in got and notes["SPICE"].startswith(coco.SPICE_MISSING + "; looked for")
    assert "stanford-corenlp-3.6.0-models.jar" in notes["SPICE"] and "METEOR" not in notes


@needs_java
def test_scoring_without_meteor(tmp_path):
    ids = list(CANDS)
    got, _, notes = compute([CANDS[i] for i in ids], [REFS[i] for i in ids], ["bleu", "meteor", "rouge", "cider",
                                                                             "spice"], spice_jar_dir=str(tmp_path),
                            meteor=False)
    want = pycocoevalcap_direct(REFS, CANDS, meteor=False)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert "METEOR" not in got and notes["METEOR"] == "disabled in config"
    assert "SPICE" not in got and str(tmp_path) in notes["SPICE"]
    with pytest.raises(ValueError, match="have no references"):
        coco_scores(REFS, {"no such image": "a"}, ["bleu"])


def test_java_missing_is_explained(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(RuntimeError, match="Java not found on PATH.*default-jre-headless"):
        coco_scores(REFS, CANDS, ["bleu"])
    with pytest.raises(RuntimeError, match="Java not found"):
        coco.ptb_tokenize({1: ["a dog"]})
    _, _, reasons = compute(["a dog"], [["a dog runs"]], ["bleu", "cider"])  # dico score: a reason per metric
    assert reasons["CIDEr"].startswith("not computed: Java not found on PATH")


def test_spice_jar_detection(tmp_path, monkeypatch):
    lib = tmp_path / "spice_lib"
    lib.mkdir()
    monkeypatch.setattr(coco, "_spice_lib", lambda: lib)
    given = tmp_path / "corenlp"
    given.mkdir()
    assert find_spice_jars(given) is None and find_spice_jars(None) is None
    (given / "stanford-corenlp-3.6.0.jar").touch()
    assert find_spice_jars(given) is None  # the models jar is missing
    reason = coco._spice_missing_reason(given)
    assert reason.startswith("not computed (Stanford CoreNLP 3.6.0 jars missing); ")
    assert str(given) in reason and str(lib) in reason and "evaluate.spice_jar_dir" in reason
    (given / "stanford-corenlp-3.6.0-models.jar").touch()
    assert find_spice_jars(given) == given
    for jar in coco.SPICE_JARS:  # pycocoevalcap's own lib/ is searched too
        (lib / jar).touch()
    assert find_spice_jars(None) == lib and find_spice_jars(tmp_path / "nowhere") == lib


def test_diversity_hand_computed():
    cands = {1: "A dog runs.", 2: "A dog runs on the grass, on the grass", 3: "a cat cat", 4: "Two birds"}
    train = ["a dog runs", "A CAT!", "two birds fly"]
    d = diversity(cands, train)
    # words: [a dog runs] [a dog runs on the grass on the grass] [a cat cat] [two birds]
    assert d["vocab_size"] == 9  # a dog runs on the grass cat two birds
    assert d["novel_pct"] == 75.0  # only "a dog runs" is a training caption
    assert d["mean_length"] == (3 + 9 + 3 + 2) / 4
    assert d["distinct_1"] == 9 / 17
    # bigrams: (a dog)(dog runs) | a-dog dog-runs runs-on on-the the-grass grass-on on-the the-grass | a-cat cat-cat
    # | two-birds: 13 bigrams, distinct: a-dog dog-runs runs-on on-the the-grass grass-on a-cat cat-cat two-birds
    assert d["distinct_2"] == 9 / 13
    assert d["repeat_pct"] == 50.0  # "on the grass" twice, "cat cat"
    assert diversity(list(cands.values()), train) == d
    assert diversity({1: ["A dog runs."]}, train)["novel_pct"] == 0.0
    # listing objects repeats bigrams ("a large") naturally: that is not degenerate repetition
    assert diversity(["a large red circle and a large blue box"], train)["repeat_pct"] == 0.0
