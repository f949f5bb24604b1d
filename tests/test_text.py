"""dico.text (decoding.postprocess: official) against the official pipeline rebuilt from real parts: a
transformers CLIPTokenizer built offline from open_clip's bundled vocabulary, its
batch_decode(skip_special_tokens=True) with transformers 4.20's clean-up, and nltk, as official
utils.py postprocess_text does (nltk.word_tokenize, PTB punctuation dropped, lower-case)."""
import copy
import gzip
import importlib.util
import json
import logging
from pathlib import Path

import nltk
import pytest

from dico import text
from dico.text import postprocess, postprocess_official, postprocess_official_batch
from worlds import TINY_CONFIG
from dico.tokenizer import CaptionTokenizer

# official utils.py postprocess_text, written down
OFFICIAL_PUNCTUATION = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                        ".", "?", "!", ",", ":", "-", "--", "...", ";"]

CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "Two dogs, one brown and one white, play!",
    "A woman's hand holding a cell-phone?", "There is a cat that isn't sleeping on the couch",
    "A plate with rice; beans and (some) salad...", 'The sign says "STOP" in red letters',
    "A 12-year-old boy flies a kite at 5:30 pm", "Three zebras grazing   in a field .",
    "They're sure we've won, I'm told", "The boys ' 2 dogs and the girls' toys",
    "rock 'n roll -- live at the café", "A dog. A cat. A bird on a wire.", "What?! No way...",
    "Naïve piñata, crème brûlée & jalapeños", "A dog 🐶 and a cat 🐱 on a sofa", "猫がソファで寝ている",
    "It's 3.5 km -- or 2,000 m -- away", "'Two beige dogs are playing in the grass near a doghouse .'",
    "a big, red, round ball; a small blue cube: both on a table", "He said: ``hello'' and left",
    "don't can't won't shouldn't y'all", "a man with a hat's brim ' s shadow", "100% sure @ the #1 spot",
    "an [old] {wooden} <box>", "A-B-C --- D", "the 1990s' best car", "  leading and trailing spaces  ",
    "UPPER CASE WORDS AND MiXeD", "a . b , c ? d ! e", "end with comma,", "",
]


def docstring_captions(limit: int) -> list[str]:
    """Real sentences other people wrote (first lines of numpy docstrings), with their punctuation."""
    import ast

    root = Path(importlib.util.find_spec("numpy").submodule_search_locations[0])
    out = []
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
                line = ast.get_docstring(node).strip().split("\n")[0]
                if 3 <= len(line.split()) <= 30:
                    out.append(line)
                if len(out) >= limit:
                    return out
    return out


@pytest.fixture(scope="module")
def hf():
    """transformers' CLIPTokenizer over open_clip's vocabulary, set up as the official main.py does
    (CLIP BOS/EOS, an added <|pad|> special token = id 49408), with 4.20's default decode clean-up."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    root = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    lines = gzip.open(root / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    tok = CLIPTokenizer(vocab=SimpleTokenizer().encoder, merges=merges, bos_token="<start_of_text>",
                        eos_token="<end_of_text>", unk_token="<end_of_text>", pad_token="<end_of_text>",
                        clean_up_tokenization_spaces=True,
                        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49408)
    return tok


def official(tok, ids) -> str:
    """save_predictions: batch_decode(skip_special_tokens=True), then postprocess_text. nltk.word_tokenize
    runs with preserve_line=True where the Punkt data is missing (as here), as dico.text does."""
    decoded = tok.batch_decode([ids], skip_special_tokens=True)[0]
    punkt = text._punkt_available()
    words = nltk.word_tokenize(decoded.strip(), preserve_line=not punkt)
    return " ".join(w.lower() for w in words if w not in OFFICIAL_PUNCTUATION)


def test_equals_the_official_pipeline_on_hand_picked_and_real_captions(hf):
    ours = CaptionTokenizer()
    captions = CAPTIONS + docstring_captions(400)
    assert len(captions) > 400
    changed = 0
    for c in captions:
        our_ids = ours.encode(c, 77)
        hf_ids = hf(c)["input_ids"]
        # the model emits ids; test both our encoding and transformers' (they differ where ftfy repairs text)
        for ids in (our_ids, hf_ids):
            generated = ids + [hf.pad_token_id] * 3           # a generated row: EOS, then pads
            got = postprocess_official(ours.decode(generated))
            assert got == official(hf, generated), (c, ids)
        changed += postprocess_official(ours.decode(our_ids)) != ours.decode(our_ids)
    assert changed > 300  # the post-processing does something on most captions


def test_clean_up_matters_where_a_quote_stands_alone(hf):
    """transformers 4.20 glues " ' " (clean_up_tokenization): "the boys ' 2 dogs" becomes one token
    "boys'2" for nltk, which it keeps; without the clean-up nltk drops the quote."""
    ours = CaptionTokenizer()
    ids = ours.encode("The boys ' 2 dogs", 77)
    assert ours.decode(ids) == "the boys ' 2 dogs"
    assert postprocess_official(ours.decode(ids)) == "the boys'2 dogs" == official(hf, ids)
    # the trap: transformers 5 skips the clean-up for BPE tokenizers unless told otherwise
    assert hf.batch_decode([ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0] == \
        "the boys ' 2 dogs"


def test_broken_utf8_from_a_cut_multibyte_character_decodes_like_transformers(hf):
    ours = CaptionTokenizer()
    # a rare character that the BPE spells as several byte tokens
    rare = next(ch for ch in "𓀀𐎀𝔄ꙮ" if len(ours.body(ours.encode(ch, 77))) > 1)
    body = ours.body(ours.encode(f"a dog {rare}", 77))
    cut = [ours.bos_id] + body[:-1] + [ours.eos_id]  # drop its last byte token: invalid UTF-8
    assert "\ufffd" in ours.decode(cut)
    assert postprocess_official(ours.decode(cut)) == official(hf, cut)


def test_modes(caplog):
    caps = ["a dog , on the grass .", "two cats 's toys !"]
    assert postprocess(caps, "none") == caps
    assert postprocess(caps, "official") == postprocess_official_batch(caps) == ["a dog on the grass",
                                                                                 "two cats 's toys"]
    with pytest.raises(ValueError, match="decoding.postprocess must be one of official, none, got 'nltk'"):
        postprocess(caps, "nltk")


def test_without_punkt_it_says_why_once_and_keeps_an_inner_period(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # no Punkt data anywhere
    text.word_tokenizer.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dico"):
            assert postprocess_official("a dog . a cat .") == "a dog. a cat"
            assert postprocess_official("one more .") == "one more"
        assert caplog.text.count("Punkt sentence model (punkt_tab) is not installed") == 1
    finally:
        text.word_tokenizer.cache_clear()


def test_with_punkt_it_is_nltk_word_tokenize_itself(monkeypatch, tmp_path):
    """A Punkt model with empty parameters (a real, untrained model: the four files punkt_tab holds)
    makes nltk.word_tokenize split sentences; dico.text must then use it and agree with it."""
    model = tmp_path / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (model / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    text.word_tokenizer.cache_clear()
    try:
        assert text.word_tokenizer() is nltk.word_tokenize
        caption = "a dog. A cat sits on a mat."
        want = " ".join(w.lower() for w in nltk.word_tokenize(caption) if w not in OFFICIAL_PUNCTUATION)
        assert postprocess_official(caption) == want == "a dog a cat sits on a mat"
    finally:
        text.word_tokenizer.cache_clear()


# -- dico generate writes the post-processed captions -------------------------------------------------
CONFIG = TINY_CONFIG


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """Demo images, features of a random tiny CLIP, and a briefly trained XE captioner that already
    writes the demo's commas ("a red circle , a blue square")."""
    import yaml

    from worlds import make_world

    root = make_world(tmp_path_factory.mktemp("generate"), n_train=24, n_val=6, n_test=6, seed=3,
                      features=("train", "val", "test"), config=CONFIG, xe_runs=("xe",))["root"]
    for mode in ("official", "none"):
        cfg = copy.deepcopy(CONFIG)
        cfg["decoding"]["postprocess"] = mode
        (root / f"{mode}.yaml").write_text(yaml.safe_dump(cfg))
    (root / "default.yaml").write_text(yaml.safe_dump(CONFIG))
    return root


def _generate(root, config, out):
    from dico import cli

    return cli.main(["generate", "--config", str(root / config), "--model", str(root / "xe" / "model.pt"),
                     "--splits", str(root / "splits.json"), "--split", "test", "--features",
                     str(root / "features" / "test" / "index.json"), "--out", str(out)])


def test_generate_writes_official_postprocessed_captions_by_default(captioner, tmp_path):
    for name in ("none", "official", "default"):
        assert _generate(captioner, f"{name}.yaml", tmp_path / f"{name}.json") == 0
    caps = {n: [c["caption"] for c in json.loads((tmp_path / f"{n}.json").read_text())]
            for n in ("none", "official", "default")}
    assert len(caps["none"]) == 6
    assert caps["official"] == [postprocess_official(c) for c in caps["none"]]
    assert caps["default"] == caps["official"]                     # the schema default is the paper's
    assert any(" ," in c or " ." in c for c in caps["none"])       # decoded text keeps BPE spacing ...
    assert caps["official"] != caps["none"]                        # ... which the official text drops
    assert not any(p in c.split() for c in caps["official"] for p in (",", ".", ":"))
