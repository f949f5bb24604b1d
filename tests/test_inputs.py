"""Property-based: whatever file `dico score` / `dico evaluate` are given as captions, references or human
judgements (random JSON of any shape, shapes close to the real layouts, other encodings, binary data,
an empty file, a folder), the readers either parse it or raise one error of one line that names the
file: never another exception (Hypothesis: 400 examples, derandomized so that every machine runs the
same ones; 6,000 random ones passed when it was written)."""
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dico.metrics.correlation import load_judgements
from dico.metrics.inputs import load_candidates, load_references

scalars = st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12)
anything = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                           max_size=4), max_leaves=16)
# valid documents of each layout the readers accept ...
text = st.text(max_size=12)
coco_results = st.lists(st.fixed_dictionaries({"image_id": st.integers(0, 9), "caption": text}), min_size=1, max_size=4)
pacscore_captions = st.dictionaries(st.text(min_size=1, max_size=6), text, min_size=1, max_size=4)
pacscore_refs = st.dictionaries(st.text(min_size=1, max_size=6), st.lists(text, min_size=1, max_size=3), min_size=1,
                                max_size=4)
karpathy = st.fixed_dictionaries({"images": st.lists(st.fixed_dictionaries(
    {"cocoid": st.integers(0, 9), "split": st.sampled_from(["train", "test", "val", "restval"]), "filename": text,
     "sentences": st.lists(st.fixed_dictionaries({"raw": text}), min_size=1, max_size=3)}), min_size=1, max_size=4)})
coco_refs = st.fixed_dictionaries({
    "annotations": st.lists(st.fixed_dictionaries({"image_id": st.integers(0, 9), "caption": text}), max_size=4),
    "images": st.lists(st.fixed_dictionaries({"id": st.integers(0, 9), "file_name": text}), max_size=3)})
split_file = st.fixed_dictionaries({"format": st.just("dico-splits-v1"), "image_root": text, "splits": st.dictionaries(
    st.sampled_from(["test", "val"]), st.lists(st.fixed_dictionaries(
        {"image_id": st.integers(0, 9), "file": text, "captions": st.lists(text, min_size=1, max_size=2)}), max_size=3),
    max_size=2)})
judgements = st.dictionaries(st.text(max_size=5), st.fixed_dictionaries(
    {"image_path": text, "ground_truth": st.lists(text, min_size=1, max_size=2),
     "human_judgement": st.lists(st.fixed_dictionaries({"caption": text, "rating": st.integers(1, 4)}), max_size=2)}),
    max_size=3)
layouts = st.one_of(coco_results, pacscore_captions, pacscore_refs, karpathy, coco_refs, split_file, judgements)


def _nodes(doc, path=()):
    """Every (path, value) of a JSON document, the root first."""
    yield path, doc
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _nodes(value, (*path, key))


def _replace(doc, path, value):
    if not path:
        return value
    doc[path[0]] = _replace(doc[path[0]], path[1:], value)
    return doc


@st.composite
def documents(draw):
    """A document of a real layout with up to three of its values replaced by anything at all (or a
    random document outright): the inputs a reader is most likely to get wrong."""
    if draw(st.integers(0, 9)) == 0:
        return draw(anything)
    doc = draw(layouts)
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p, _ in _nodes(doc)]
        doc = _replace(doc, paths[draw(st.integers(0, len(paths) - 1))], draw(scalars | anything))
    return doc


READERS = {"candidates": load_candidates, "references": load_references,
           "references of a split": lambda p: load_references(p, "test"), "judgements": lambda p: load_judgements(p)[0]}


def _write(folder: Path, doc, encoding: str, kind: str) -> Path:
    path = folder / "input.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes([0x89, 0x50, 0xff, 0x00, 0xfe]) + json.dumps(doc, default=str).encode())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_text(json.dumps(doc, default=str)[:-1] or "[")
    else:
        path.write_bytes(json.dumps(doc, default=str, ensure_ascii=False).encode(encoding, errors="replace"))
    return path


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents(), encoding=st.sampled_from(["utf-8"] * 4 + ["utf-8-sig", "utf-16", "latin-1"]),
       kind=st.sampled_from(["json"] * 12 + ["folder", "binary", "empty", "truncated"]))
def test_a_reader_parses_its_input_or_names_the_file_in_one_line(doc, encoding, kind):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), doc, encoding, kind)
        for name, read in READERS.items():
            try:
                read(path)
            except (ValueError, FileNotFoundError) as e:  # InputError is a ValueError
                message = str(e)
                assert str(path) in message, (name, message)
                assert "\n" not in message, (name, message)
