"""The paper's inputs in miniature, served from a loopback HTTP server: the rehearsal's world.

Everything the paper config downloads, with the real formats and the real architectures but few
images and random weights (nothing may reach the internet or a model hub):
- `train2014.zip` / `val2014.zip` in COCO's layout (`train2014/COCO_train2014_<id:012d>.jpg`) with
  JPEGs of COCO's usual sizes and aspect ratios, greyscale and CMYK ones included (COCO has both);
- Karpathy's `caption_datasets.zip` with a `dataset_coco.json` in its schema (`cocoid`, `filepath`,
  `filename`, `imgid`, `sentids`, `sentences[].raw/tokens/imgid/sentid`, splits train / restval /
  val / test, 5, 6 or 7 captions per image) next to a `dataset_flickr8k.json`, as the real zip;
- OpenAI-layout CLIP checkpoints of the real architectures (ViT-L/14 and ViT-B/32, QuickGELU,
  random init) saved as fp16 state dicts, as OpenAI ships its weights in half precision;
- the PAC-S checkpoint layout, `{'state_dict': ...}` of an fp32 ViT-B/32, served behind a Google
  Drive "can't scan for viruses" page, as the paper config's Drive link is.

`LoopbackServer` serves any of them (127.0.0.1 only); `url_config` writes the config layer that
points every download URL of config/paper.yaml at it and pins each file's sha256, so the real
download rules run with their checks. The released DiCO checkpoint is one more entry of
`served_files` once its builder exists (tests/hf_reference.py).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import random
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np

# open_clip configs of OpenAI's architectures (QuickGELU, as the OpenAI weights were trained)
ARCH = {"clip_l14": "ViT-L-14-quickgelu", "clip": "ViT-B-32-quickgelu", "pac": "ViT-B-32-quickgelu"}

# (split, folder): train images come from train2014, restval / val / test from val2014 (Karpathy)
LAYOUT = [("train", "train2014")] * 10 + [("restval", "val2014")] * 4 + [("val", "val2014")] * 5 \
    + [("test", "val2014")] * 5
# COCO's common sizes (w, h), a tiny and an elongated one; cycled over the images
SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (612, 612), (640, 640), (320, 240),
         (640, 160)]
GREY_EVERY, CMYK_EVERY = 7, 11  # every 7th image greyscale ('L'), every 11th CMYK

_SUBJECTS = ["man", "woman", "dog", "cat", "child", "giraffe", "bus", "train", "plate of food", "surfer",
             "group of people", "zebra", "bird", "kitchen", "pizza", "motorcycle", "skateboarder"]
_ACTIONS = ["sitting on", "standing next to", "riding", "walking along", "looking at", "lying on",
            "parked near", "flying over", "holding", "eating"]
_OBJECTS = ["a bench", "the beach", "a wooden table", "a busy street", "a grassy field", "the snow",
            "a red umbrella", "a white plate", "the water", "a tall building", "a kite", "a laptop"]
_OPENERS = ["A", "An image of a", "There is a", "This is a", "Close up of a", "A photo of a"]


# -- images ---------------------------------------------------------------------------------------
def jpeg(path: Path, seed: int, size: tuple[int, int], mode: str) -> None:
    """A JPEG with smooth colour fields, hard-edged shapes and grain (decodes like a photo)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    im = Image.fromarray(low, "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(im, np.float32) + rng.normal(0, 5, (h, w, 3))
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=85)


def coco_images() -> list[dict]:
    """One entry per image: split, folder, COCO file name, cocoid, size, colour mode."""
    out = []
    for n, (split, folder) in enumerate(LAYOUT):
        cocoid = 9 + 37 * n  # sparse ids, like COCO's
        mode = "L" if n % GREY_EVERY == 3 else "CMYK" if n % CMYK_EVERY == 5 else "RGB"
        out.append({"split": split, "folder": folder, "cocoid": cocoid, "imgid": n,
                    "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "size": SIZES[n % len(SIZES)], "mode": mode})
    return out


def write_coco_zips(root: Path, images: list[dict]) -> dict[str, Path]:
    """train2014.zip and val2014.zip: every entry under its top folder, as COCO's zips."""
    zips = {}
    for folder in sorted({im["folder"] for im in images}):
        path = root / f"{folder}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for im in (i for i in images if i["folder"] == folder):
                tmp = root / "jpg" / im["filename"]
                jpeg(tmp, im["cocoid"], im["size"], im["mode"])
                zf.write(tmp, f"{folder}/{im['filename']}")
        zips[folder] = path
    return zips


# -- captions -------------------------------------------------------------------------------------
def caption(rng: random.Random) -> str:
    """A COCO-like caption (varied openers, capitals and end punctuation, as COCO's raw captions)."""
    text = f"{rng.choice(_OPENERS)} {rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.3:
        text += f" with {rng.choice(_OBJECTS)}"
    return text + rng.choice([".", "", " .", "!"])


def karpathy_tokens(raw: str) -> list[str]:
    """Karpathy's `tokens`: lower-cased words, punctuation dropped."""
    return [w for w in "".join(c if c.isalnum() or c == " " else " " for c in raw.lower()).split()]


def karpathy_json(images: list[dict], seed: int = 0) -> dict:
    rng = random.Random(seed)
    entries, sentid = [], 0
    for n, im in enumerate(images):
        k = (5, 6, 7)[n % 3]  # COCO images have 5-7 captions
        sents = []
        for _ in range(k):
            raw = caption(rng)
            sents.append({"tokens": karpathy_tokens(raw), "raw": raw, "imgid": im["imgid"], "sentid": sentid})
            sentid += 1
        entries.append({"filepath": im["folder"], "sentids": [s["sentid"] for s in sents],
                        "filename": im["filename"], "imgid": im["imgid"], "split": im["split"],
                        "sentences": sents, "cocoid": im["cocoid"]})
    return {"images": entries, "dataset": "coco"}


def write_karpathy_zip(root: Path, images: list[dict]) -> Path:
    """caption_datasets.zip: dataset_coco.json beside another data set's file (only one is kept)."""
    path = root / "caption_datasets.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dataset_coco.json", json.dumps(karpathy_json(images)))
        zf.writestr("dataset_flickr8k.json", json.dumps({"images": [], "dataset": "flickr8k"}))
    return path


# -- checkpoints ----------------------------------------------------------------------------------
def clip_model(arch: str, seed: int):
    """A randomly initialised open_clip model of an OpenAI architecture (QuickGELU, OpenAI names)."""
    import logging

    import open_clip
    import torch

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": none are wanted
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(arch, pretrained=None)
    finally:
        logging.getLogger().setLevel(level)


def write_openai_checkpoint(path: Path, arch: str, seed: int) -> Path:
    """OpenAI-style weights: the state dict in fp16 (OpenAI's files hold half-precision weights)."""
    import torch

    sd = {k: v.detach().half() for k, v in clip_model(arch, seed).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def write_pacs_checkpoint(path: Path, arch: str, seed: int) -> Path:
    """The PAC-S layout: {'state_dict': fp32 OpenAI-named weights of a ViT-B/32}."""
    import torch

    sd = {k: v.detach().float() for k, v in clip_model(arch, seed).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd}, path)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def build_inputs(root: Path) -> dict[str, Path]:
    """Every file the paper config downloads, built under `root` (minutes: the ViT-L/14 is 0.86 GB)."""
    root.mkdir(parents=True, exist_ok=True)
    images = coco_images()
    files = {f"coco_{k}": v for k, v in write_coco_zips(root, images).items()}
    files["karpathy"] = write_karpathy_zip(root, images)
    files["clip_l14"] = write_openai_checkpoint(root / "ViT-L-14.pt", ARCH["clip_l14"], seed=1)
    files["clip"] = write_openai_checkpoint(root / "ViT-B-32.pt", ARCH["clip"], seed=2)
    files["pac"] = write_pacs_checkpoint(root / "clip_ViT-B-32.pth", ARCH["pac"], seed=3)
    files["official"] = write_official_release(root / "dico-ViTL14.zip", seed=4)
    return files


def write_official_release(path: Path, seed: int) -> Path:
    """The released DiCO checkpoint at the paper's shapes, built with the real transformers classes
    (tests/hf_reference.py: BertModel + GPT2LMHeadModel with cross-attention + the bridge, config.json
    in the official VisionEncoderDecoder schema), zipped as a save_pretrained folder on a Drive. Its
    weights file pickles a training-arguments object next to the tensors, as DeepSpeed checkpoints
    do, so the rehearsal walks the guarded path: refused unpinned, read when official.sha256 pins it."""
    import argparse
    import zipfile

    import torch

    from dico.model import CaptionerConfig
    from dico.tokenizer import CLIP_BOS, CLIP_EOS, CLIP_PAD, CLIP_VOCAB
    from hf_reference import write_release

    cfg = CaptionerConfig(feat_dim=1024, vocab_size=CLIP_VOCAB, pad_id=CLIP_PAD, bos_id=CLIP_BOS, eos_id=CLIP_EOS)
    folder = write_release(path.with_suffix(""), cfg, seed=seed)
    weights = folder / "pytorch_model.bin"
    sd = torch.load(weights, weights_only=True)
    torch.save({"module": sd, "args": argparse.Namespace(fp16=True, zero_stage=2)}, weights)
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{path.stem}/{f.name}")
    shutil.rmtree(folder)
    return path


# -- the server -----------------------------------------------------------------------------------
DRIVE_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" value="Download anyway"/><input type="hidden" name="id" value="{id}">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="{uuid}"></form></body></html>"""


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: LoopbackServer = self.server.owner
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        srv.requests.append(url.path)
        if url.path == "/drive/uc" and query.get("id") in srv.drive:  # the page first, the bytes via its form
            page = DRIVE_PAGE.format(action=f"{srv.base}/drive/download", id=query["id"], uuid=srv.uuid)
            return self._bytes(200, page.encode(), "text/html; charset=utf-8")
        if url.path == "/drive/download":
            if query.get("confirm") != "t" or query.get("uuid") != srv.uuid or query.get("id") not in srv.drive:
                return self._bytes(403, b"confirmation missing", "text/plain")
            return self._file(srv.drive[query["id"]])
        if url.path in srv.files:
            return self._file(srv.files[url.path])
        self._bytes(404, b"not here", "text/plain")

    def _bytes(self, status: int, data: bytes, ctype: str):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _file(self, path: Path):
        """Streams the file from disk, honouring a `Range: bytes=N-` resume request."""
        size = path.stat().st_size
        rng = self.headers.get("Range")
        start = int(rng[len("bytes="):].split("-")[0]) if rng and rng.startswith("bytes=") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            while block := f.read(1 << 20):
                self.wfile.write(block)


class LoopbackServer:
    """`with LoopbackServer() as srv:` serves `srv.add(url_path, file)` and Drive-style
    `srv.add_drive(file_id, file)` entries on 127.0.0.1 at a free port."""

    def __init__(self):
        self.files: dict[str, Path] = {}
        self.drive: dict[str, Path] = {}
        self.requests: list[str] = []
        self.uuid = "5eed-0f-d1c0"
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self.base = f"http://127.0.0.1:{self._httpd.server_port}"

    def add(self, url_path: str, file: Path) -> str:
        self.files[url_path] = Path(file)
        return self.base + url_path

    def add_drive(self, file_id: str, file: Path) -> str:
        self.drive[file_id] = Path(file)
        return f"{self.base}/drive/uc?" + urlencode({"export": "download", "id": file_id})

    def __enter__(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


# A real Punkt model, tiny: nltk's punkt_tab layout (punkt_tab/<language>/ with the four files that
# nltk.tokenize.punkt.load_punkt_params reads). "dr" is an abbreviation: no sentence ends after "dr.".
PUNKT_TAB = {"collocations.tab": "", "sent_starters.txt": "the\n", "abbrev_types.txt": "dr\nmr\n",
             "ortho_context.tab": "the\t34\n"}


def write_punkt_tab_zip(path: Path) -> Path:
    """nltk_data's punkt_tab.zip in miniature: punkt_tab/README and punkt_tab/english/<the four files>."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("punkt_tab/README", "Punkt sentence tokenizer models (test stand-in)\n")
        for name, text in PUNKT_TAB.items():
            zf.writestr(f"punkt_tab/english/{name}", text)
    return path


def served_files(srv: LoopbackServer, files: dict[str, Path]) -> dict:
    """Serve every input at a URL shaped like the real one; the config layer pointing at them, with
    each file's sha256 pinned (the real download rules check it)."""
    def entry(url):
        return {"url": url, "sha256": None}

    cfg = {"data": {"downloads": {"coco_images": {}, "karpathy": {}}}, "clip_models": {}}
    for part in ("train2014", "val2014"):
        cfg["data"]["downloads"]["coco_images"][part] = entry(srv.add(f"/zips/{part}.zip", files[f"coco_{part}"]))
    cfg["data"]["downloads"]["karpathy"] = entry(
        srv.add("/people/karpathy/deepimagesent/caption_datasets.zip", files["karpathy"]))
    cfg["clip_models"]["clip_l14"] = entry(srv.add("/clip/models/l14/ViT-L-14.pt", files["clip_l14"]))
    cfg["clip_models"]["clip"] = entry(srv.add("/clip/models/b32/ViT-B-32.pt", files["clip"]))
    cfg["clip_models"]["pac"] = entry(srv.add_drive("pacs-vit-b-32", files["pac"]))
    shas = {"train2014": files["coco_train2014"], "val2014": files["coco_val2014"]}
    for part, path in shas.items():
        cfg["data"]["downloads"]["coco_images"][part]["sha256"] = sha256(path)
    cfg["data"]["downloads"]["karpathy"]["sha256"] = sha256(files["karpathy"])
    for name in ("clip_l14", "clip", "pac"):
        cfg["clip_models"][name]["sha256"] = sha256(files[name])
    cfg["official"] = {"url": srv.add_drive("dico-vitl14", files["official"]), "sha256": sha256(files["official"])}
    punkt = write_punkt_tab_zip(files["karpathy"].parent / "punkt_tab.zip")
    cfg["data"]["downloads"]["punkt_tab"] = {"url": srv.add("/nltk_data/packages/tokenizers/punkt_tab.zip", punkt),
                                             "sha256": sha256(punkt)}
    # SPICE's CoreNLP jars have no stand-in (SPICE would run them): none is planned, SPICE stays null
    cfg["evaluate"] = {"spice_jars": None}
    return cfg
