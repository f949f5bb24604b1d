"""Reading the released DiCO checkpoint: a folder, an archive of it or a bare weights file, and the
safety of the pickles inside.

The release is an HF `save_pretrained` folder of the official VisionEncoderDecoderModel
(config.json + pytorch_model.bin or model.safetensors), shared on Google Drive as one file, so we
ASSUME a zip of that folder; the reader sniffs what it gets instead of trusting the name: a folder, a
zip or tar of it (the folder may be nested), or a bare weights file (.bin / .safetensors / DeepSpeed
mp_rank_*_model_states.pt, with config.json beside it).

Files from the internet are data, not code: a pytorch_model.bin that pickles anything besides
tensors (torch.load(weights_only=True) refuses it) is only unpickled when the file is pinned
(official.sha256 = --sha256, checked before anything is read) or trusted explicitly
(official.trust_pickle = --trust-pickle).
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..io import sha256_file

log = logging.getLogger("dico")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


# -- reading the release ---------------------------------------------------------------------------
def _find(root: Path, names) -> Path | None:
    """The shallowest file under `root` named like one of `names` (in that order of preference)."""
    for name in names:
        hits = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p)))
        if hits:
            return hits[0]
    return None


def _unpack(archive: Path, tmp: Path) -> Path:
    """Extract only config.json and the weights of an archived HF folder into `tmp`."""
    wanted = lambda name: Path(name).name in ("config.json", *WEIGHT_FILES) or name.endswith(".safetensors") \
        or re.search(r"pytorch_model-\d+-of-\d+\.bin$", name)  # noqa: E731 (shards of an index)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if wanted(info.filename) and ".." not in Path(info.filename).parts:
                    zf.extract(info, tmp)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, members=[m for m in tf.getmembers() if m.isfile() and wanted(m.name)],
                          filter="data")
    return tmp


def _is_archive(path: Path) -> bool:
    """A zip or tar of a folder; torch.save files are zips too, told apart by their data.pkl."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return not any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
    return tarfile.is_tarfile(path)


def _load_pickle(path: Path, trusted: bool):
    """torch.load with weights_only=True; a file that pickles other objects is unpickled only when
    `trusted` (pinned by sha256 or --trust-pickle), since unpickling can run code from the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError naming the global, or a file that is no torch file at all
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if glob is None:  # torch's own advice (load with weights_only=False) would be wrong here: not a checkpoint
            first = next((line.strip() for line in str(e).splitlines() if line.strip()
                          and "weights_only" not in line), "")
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (neither torch.save's zip nor a complete "
                             f"pickle: {type(e).__name__}: {first[:160]}); download the release again") from None
        if not trusted:
            raise ValueError(
                f"{path} pickles a Python object ({glob.group(1)}) besides tensors, so reading it would run code "
                "from the file (torch.load weights_only=False). Either pin the file: set official.sha256 to its "
                "sha256 (passed as `dico convert-official --sha256`), or, if you trust where it came from, set "
                "official.trust_pickle: true (`--trust-pickle`)") from None
    log.warning("%s pickles %s besides tensors: unpickled with weights_only=False (pinned by sha256 or trusted)",
                path, glob.group(1))
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_tensors(path: Path, trusted: bool = False) -> dict:
    if path.name.endswith(".index.json"):  # sharded save_pretrained
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(_load_tensors(path.parent / shard, trusted))
        return out
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("reading .safetensors needs the safetensors package (installed with "
                              "open_clip_torch)") from None
        return load_file(str(path))
    blob = _load_pickle(path, trusted)
    for key in ("module", "state_dict", "model"):  # DeepSpeed / Lightning-style wrappers
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    return {k.removeprefix("module."): v for k, v in blob.items()}


def _check_pin(src: Path, sha256: str) -> None:
    """--sha256 pins the file given (archive or weights), or a folder's weights file."""
    target = src if src.is_file() else _find(src, WEIGHT_FILES)
    if target is None:
        raise FileNotFoundError(f"{src}: no {' / '.join(WEIGHT_FILES)} inside")
    digest = sha256_file(target)
    if digest != sha256.strip().lower():
        raise ValueError(f"{target}: sha256 is {digest}, but official.sha256 (--sha256) pins {sha256}; "
                         "download the release again, or correct official.sha256 if the file is the right one")


def load_release(src: str | Path, sha256: str | None = None, trust_pickle: bool = False) -> tuple[dict, dict | None]:
    """(state dict, parsed config.json or None) of the release at `src` (folder, archive or file).
    `sha256` (checked first) or `trust_pickle` allow weights that pickle more than tensors."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: the official DiCO checkpoint is not there (download it with "
                                f"`snakemake download_official` or by hand from the DiCO README's Drive link)")
    if sha256:
        _check_pin(src, sha256)
    return _read_release(src, trusted=bool(sha256) or trust_pickle)


def _read_release(src: Path, trusted: bool) -> tuple[dict, dict | None]:
    if src.is_file() and _is_archive(src):
        near = src.parent if os.access(src.parent, os.W_OK) else None  # /tmp may be too small for 1.5 GB
        with tempfile.TemporaryDirectory(prefix=".official-", dir=near) as tmp:
            try:
                return _read_release(_unpack(src, Path(tmp)), trusted)
            except (ValueError, FileNotFoundError) as e:  # name the archive the user has, not the temporary
                text = str(e).replace(tmp + os.sep, "").replace(tmp, "the archive")
                raise type(e)(f"{src}: {text}") from None
    if src.is_dir():
        weights, config = _find(src, WEIGHT_FILES), _find(src, ["config.json"])
        if weights is None:
            raise FileNotFoundError(f"{src}: no {' / '.join(WEIGHT_FILES)} inside; give the release's folder, its "
                                    "zip or tar, or its weights file")
    else:
        weights, config = src, src.with_name("config.json")
    hf_config = json.loads(config.read_text()) if config is not None and config.exists() else None
    log.info("official checkpoint: weights %s, config %s", weights, config if hf_config else "none")
    return _load_tensors(weights, trusted), hf_config


# generation settings of a 4.20 config whose non-default values change what generate() does; the
# official scripts pass num_beams and max_length explicitly, so those two are not listed
GENERATION_DEFAULTS = {"min_length": 0, "do_sample": False, "early_stopping": False, "num_beam_groups": 1,
                       "diversity_penalty": 0.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
                       "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
                       "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
                       "exponential_decay_length_penalty": None}


def generation_overrides(hf: dict | None) -> dict:
    """The release config's top-level generation settings that differ from transformers' defaults
    (the top level is what the official model.generate reads)."""
    return {k: hf[k] for k, default in GENERATION_DEFAULTS.items() if hf and k in hf and hf[k] != default}
