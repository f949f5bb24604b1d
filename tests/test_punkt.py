"""The official post-processing's data: rule download_punkt_tab fetches nltk's punkt_tab (a real, tiny
Punkt model in nltk_data's zip layout, from a loopback server, sha256 pinned) into decoding.nltk_data,
and the post-processing `dico generate` runs then uses it: nltk.word_tokenize with sentence splitting,
no warning. A zip whose sha256 differs is refused; without the data the fallback and its warning stay."""
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import nltk
import pytest
import yaml

import paper_fixtures as F
from dico import text
from worlds import copy_workflow

ROOT = Path(__file__).resolve().parents[1]
# "dr" is an abbreviation of the stand-in model: Punkt ends a sentence after "dog." but not after "dr."
CAPTION = "a dog. dr. smith walks"


@pytest.fixture(autouse=True)
def fresh_nltk(monkeypatch):
    """Each test starts from nltk's search path and no loaded Punkt model (nltk caches the one it loaded),
    and leaves none behind for other tests."""
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))  # use_nltk_data prepends to it
    for cached in (text.word_tokenizer, nltk.tokenize._get_punkt_tokenizer):
        cached.cache_clear()
    yield
    for cached in (text.word_tokenizer, nltk.tokenize._get_punkt_tokenizer):
        cached.cache_clear()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("nltk_data_server")
    zip_path = F.write_punkt_tab_zip(root / "punkt_tab.zip")
    with F.LoopbackServer() as srv:
        yield srv.add("/nltk/nltk_data/gh-pages/packages/tokenizers/punkt_tab.zip", zip_path), zip_path


def _snakemake(wf: Path, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["snakemake", "--configfile", "test.yaml", "--cores", "1", *args], cwd=wf, env=env,
                          capture_output=True, text=True, timeout=300)


def test_download_punkt_tab_then_generate_postprocessing_uses_it(served, tmp_path, caplog):
    url, zip_path = served
    wf = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.setdefault("decoding", {})["nltk_data"] = "resources/nltk_data"
    config.setdefault("data", {}).setdefault("downloads", {})["punkt_tab"] = {
        "url": url, "sha256": hashlib.sha256(zip_path.read_bytes()).hexdigest()}
    (wf / "test.yaml").write_text(yaml.safe_dump(config))
    plan = _snakemake(wf, "-n", "results/captions/xe/test.json")  # generate waits for the data
    assert plan.returncode == 0 and "download_punkt_tab" in plan.stdout, plan.stdout[-3000:] + plan.stderr[-2000:]
    out = _snakemake(wf, "download_punkt_tab")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    model = wf / "resources" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert {p.name: p.read_text() for p in model.iterdir()} == F.PUNKT_TAB  # unpacked, not nested twice
    assert not (wf / "resources" / "downloads" / "punkt_tab.zip").exists()  # archive deleted, record kept

    decoding = {"postprocess": "official", "nltk_data": str(wf / "resources" / "nltk_data")}
    with caplog.at_level(logging.WARNING, logger="dico"):
        got = text.postprocess([CAPTION], decoding["postprocess"], decoding["nltk_data"])  # as dico.inference
    assert "punkt_tab" not in caplog.text  # no fallback warning
    assert text.word_tokenizer(decoding["nltk_data"]) is nltk.word_tokenize
    # Punkt split "a dog." | "dr. smith walks" (dr is an abbreviation): the final "." of the first sentence
    # is its own token, dropped; "dr." stays one token. nltk's own call agrees.
    assert got == ["a dog dr. smith walks"]
    assert got[0] == " ".join(w.lower() for w in nltk.word_tokenize(CAPTION) if w not in text.PUNCTUATION)


def test_a_zip_with_another_sha256_is_refused(served, tmp_path):
    from dico.cli import main

    url, _ = served
    out = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab"
    assert main(["download", "zip", "--url", url, "--archive", str(tmp_path / "punkt_tab.zip"), "--out", str(out),
                 "--sha256", "0" * 64, "--retries", "0", "--no-progress"]) == 1
    assert not out.exists() and not (tmp_path / "punkt_tab.zip").exists()


def test_without_the_data_the_fallback_warns_and_names_the_folder(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [])  # no punkt_tab anywhere, not even in ~/nltk_data
    empty = tmp_path / "nltk_data"
    with caplog.at_level(logging.WARNING, logger="dico"):
        assert text.postprocess([CAPTION], "official", str(empty)) == ["a dog. dr. smith walks"]
    assert f"not installed in {empty} (decoding.nltk_data)" in caplog.text
    assert "snakemake download_punkt_tab --cores 1" in caplog.text
