"""Every bad input named, every output whole: the `dico` commands' error boundary, their output checks
and the cases that used to pass silently, one test per finding (run through the real command line)."""
import json
import logging
import shutil
import zipfile

import pytest
import torch

from dico import cli
from dico.clip_weights import save_evaluator
from dico.demo.clip import build_tiny_clip, tiny_clip_config
from test_score import PACS_GOOD, PACS_REFS, _image
from worlds import run_dico

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java")


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    """pacscore's example (two images, their captions and references) and a random tiny CLIP."""
    root = tmp_path_factory.mktemp("errors")
    (root / "good.json").write_text(PACS_GOOD)
    (root / "refs.json").write_text(PACS_REFS)
    for n in (1, 2):
        _image(root / "images" / f"image{n}.jpg", n)
    cfg = tiny_clip_config(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                           text_width=64, text_layers=1, context_length=32)
    save_evaluator(build_tiny_clip(cfg, seed=0), root / "clip.pt")
    return root


def score(caplog, ex, *argv):
    """(exit code, log) of `dico score` on the example with `argv` added."""
    code, _, text = run_dico(caplog, "score", "--captions", ex / "good.json", "--refs", ex / "refs.json", *argv)
    return code, text


# -- 1. operating-system errors: one line, the user's path --------------------------------------------
def test_a_folder_as_captions_is_one_line(caplog, ex):
    code, _, text = run_dico(caplog, "score", "--captions", ex / "images", "--refs", ex / "refs.json",
                             "--metrics", "bleu")
    assert code == 1 and f"{ex / 'images'}: is a folder, not a JSON file" in text and "Traceback" not in text


def test_an_unwritable_out_names_the_flag_and_the_path_not_a_temporary(caplog, ex, tmp_path):
    (tmp_path / "file.json").write_text("{}")
    for out, why in ((tmp_path / "file.json" / "m.json", "a part of it is a file"),
                     ("/proc/dico-nowhere/m.json", "cannot write there")):
        code, text = score(caplog, ex, "--metrics", "bleu", "--out", out)
        assert code == 1 and f"--out {out}: " in text and why in text, text
        assert ".tmp" not in text and "Traceback" not in text


def test_an_os_error_anywhere_is_one_line_naming_its_path(caplog, tmp_path):
    code, _, text = run_dico(caplog, "prepare-splits", "--karpathy-json", tmp_path, "--image-root", "x", "--out",
                             tmp_path / "s.json")
    assert code == 1 and f"{tmp_path}: is a folder" in text and "Traceback" not in text


# -- 2. outputs checked before the work -------------------------------------------------------------------
def test_outputs_are_checked_before_any_work(caplog, ex, monkeypatch):
    from dico.metrics import score_files

    called = []
    monkeypatch.setattr(score_files, "load_inputs", lambda *a, **k: called.append(a))
    code, text = score(caplog, ex, "--out", ex / "m.json", "--per-caption", "/proc/dico-nowhere/pc.csv")
    assert code == 1 and "--per-caption /proc/dico-nowhere/pc.csv: cannot write there" in text
    assert called == [] and not (ex / "m.json").exists()


# -- 3. a failed command leaves no output -----------------------------------------------------------------
@needs_java
def test_a_command_that_fails_writing_leaves_none_of_its_outputs(caplog, ex, tmp_path, monkeypatch):
    from dico.metrics import score_files

    def fails(result):
        raise OSError(28, "No space left on device", str(tmp_path / "pc.csv"))

    monkeypatch.setattr(score_files, "per_caption_csv", fails)
    code, text = score(caplog, ex, "--metrics", "bleu", "--out", tmp_path / "o.json", "--per-caption",
                       tmp_path / "pc.csv")
    assert code == 1 and "no space left on the device" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither o.json nor a temporary


def test_outputs_are_written_all_or_none(tmp_path):
    from dico.io import Outputs

    with pytest.raises(RuntimeError):
        with Outputs() as out:
            out.write_text(tmp_path / "a.txt", "a")
            out.write_json(tmp_path / "b.json", {"b": 1})
            raise RuntimeError("the work failed after writing")
    assert list(tmp_path.iterdir()) == []
    with Outputs() as out:
        out.write_text(tmp_path / "a.txt", "a")
        out.write_json(tmp_path / "b.json", {"b": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


# -- 4. the fix the command has ---------------------------------------------------------------------------
@needs_java
def test_a_broken_image_names_skip_broken_images_which_score_takes(caplog, ex, tmp_path):
    shutil.copytree(ex / "images", tmp_path / "images")
    (tmp_path / "images" / "image2.jpg").write_bytes(b"not a jpeg")
    args = ("--images", tmp_path / "images", "--pac", ex / "clip.pt", "--metrics", "bleu,pac-s", "--workers", "0")
    code, text = score(caplog, ex, *args)
    assert code == 1 and "image2.jpg cannot be decoded" in text and "--skip-broken-images" in text
    assert "features.skip_broken_images" not in text
    code, text = score(caplog, ex, *args, "--skip-broken-images", "--out", tmp_path / "m.json")
    result = json.loads((tmp_path / "m.json").read_text())
    assert code == 0 and result["skipped_images"] == ["image2"] and result["n_scored"] == 1
    assert "left out of every metric" in result["reasons"]["skipped_images"]


def test_an_unknown_flag_prints_the_usage_of_the_command(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["score", "--skip-broken-imagez"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: dico score ") and "unrecognized arguments" in err


# -- 5. nothing accepted silently -------------------------------------------------------------------------
@needs_java
def test_empty_and_truncated_captions_are_counted(caplog, ex, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"image1": "", "image2": "a dog " * 40}))
    code, _, text = run_dico(caplog, "score", "--captions", tmp_path / "c.json", "--refs", ex / "refs.json",
                             "--images", ex / "images", "--pac", ex / "clip.pt", "--metrics", "bleu,pac-s",
                             "--out", tmp_path / "m.json", "--workers", "0")
    warnings = json.loads((tmp_path / "m.json").read_text())["warnings"]
    assert code == 0 and warnings == {"empty_captions": 1, "truncated_captions_pac-s": 1}
    assert "empty_captions" in text  # and said in the log


def test_a_key_twice_in_pacscore_captions_is_an_error(caplog, ex, tmp_path):
    (tmp_path / "c.json").write_text('{"image1": "a dog", "image2": "a cat", "image1": "another dog"}')
    code, _, text = run_dico(caplog, "score", "--captions", tmp_path / "c.json", "--refs", ex / "refs.json")
    assert code == 1 and "c.json: key 'image1' appears twice in one object" in text


@pytest.mark.parametrize("argv,needs", [(("--metrics", "clip-s", "--images", "IMAGES"), "--clip PATH"),
                                        (("--metrics", "refpac-s", "--pac", "CLIP"), "--images DIR")])
def test_a_metric_asked_for_by_name_that_cannot_run_is_an_error(caplog, ex, tmp_path, argv, needs):
    argv = [ex / "images" if a == "IMAGES" else ex / "clip.pt" if a == "CLIP" else a for a in argv]
    code, text = score(caplog, ex, *argv, "--out", tmp_path / "m.json")
    assert code == 1 and f"needs {needs}" in text and not (tmp_path / "m.json").exists()


# -- 6. messages that say what is wrong -------------------------------------------------------------------
def test_a_byte_order_mark_is_read_and_a_binary_file_named(tmp_path):
    from dico.metrics.inputs import load_candidates

    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + PACS_GOOD.encode())
    assert load_candidates(tmp_path / "bom.json") == json.loads(PACS_GOOD)
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ValueError, match=r"bin.json: not a UTF-8 text file \(byte \d+"):
        load_candidates(tmp_path / "bin.json")


def test_a_split_that_is_not_there_lists_those_that_are(tmp_path):
    from dico.metrics.inputs import load_references

    images = [{"cocoid": i, "split": s, "sentences": [{"raw": "a cat"}]} for i, s in enumerate(["train", "test"])]
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=r"no images in split 'tset'; its splits are test, train: pass one"):
        load_references(tmp_path / "k.json", "tset")


def test_a_coco_image_without_annotations_is_named(caplog, tmp_path):
    (tmp_path / "refs.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"},
                                                              {"id": 2, "file_name": "b.jpg"}],
                                                   "annotations": [{"image_id": 1, "caption": "a cat"}]}))
    (tmp_path / "c.json").write_text(json.dumps([{"image_id": 1, "caption": "a cat"}, {"image_id": 2, "caption": "x"}]))
    code, _, text = run_dico(caplog, "score", "--captions", tmp_path / "c.json", "--refs", tmp_path / "refs.json")
    assert code == 1 and "candidate 2 is an image of" in text and "no caption in its 'annotations'" in text


def test_a_release_of_random_bytes_or_an_empty_zip_is_named_plainly(caplog, tmp_path):
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 4)
    code, _, text = run_dico(caplog, "convert-official", "--src", tmp_path / "random.bin", "--out",
                             tmp_path / "m.pt", "--trust-pickle")
    assert code == 1 and "random.bin is not a readable PyTorch checkpoint" in text and "weights_only" not in text
    with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
        pass
    code, _, text = run_dico(caplog, "convert-official", "--src", tmp_path / "empty.zip", "--out", tmp_path / "m.pt")
    assert code == 1 and f"{tmp_path / 'empty.zip'}: the archive: no " in text and ".official-" not in text
    assert not (tmp_path / "m.pt").exists()


# -- 7. help that helps -----------------------------------------------------------------------------------
def _commands(parser, prefix=()):
    """(words, parser) of every (sub-)command of the `dico` parser."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


def test_every_command_says_what_it_does_and_every_flag_has_help(capsys):
    parser = cli.build_parser()
    commands = list(_commands(parser))
    assert len(commands) >= 20
    for words, sub in commands:
        assert sub.description and len(sub.description) > 20, words
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"dico {' '.join(words)} {action.option_strings[0]} has no help text"
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("dico 0.")


# -- the error boundary: our own bugs ------------------------------------------------------------------
def test_a_bug_prints_its_traceback_and_says_it_is_one(caplog, capsys, monkeypatch):
    from dico.cli import data

    def bug(args):
        return [][1]

    monkeypatch.setattr(data, "cmd_make_demo_data", bug)
    with caplog.at_level(logging.INFO, logger="dico"):
        code = cli.main(["make-demo-data", "--out-dir", "x"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "IndexError" in err
    assert "this is a bug in dico" in caplog.text and "dico-bug-" in caplog.text
    kept = caplog.text.split("(kept in ")[1].split(")")[0]
    assert "IndexError" in open(kept).read()


def test_torch_is_not_imported_to_print_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, dico.cli; dico.cli.build_parser(); "
                          "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    assert torch  # (the test process itself has it)
