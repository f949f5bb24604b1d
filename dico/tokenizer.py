"""Caption tokenizer: CLIP's byte-level BPE (open_clip's bundled vocabulary) plus a pad id.

The official DiCO code uses the CLIP tokenizer of ViT-L/14 (49,408 tokens, BOS 49406, EOS 49407)
and adds `<|pad|>` = 49408, so the captioner's vocabulary has 49,409 entries and generated ids can
be fed to a CLIP text encoder directly (official main.py, utils.py compute_clip_score).

A captioner does not have to predict all 49,409 entries: `vocab="train"` keeps only the BPE tokens
that occur in the training captions (plus BOS, EOS and pad). The ids the model sees are then
*compact* ids 0..V-1 and `clip_ids` maps them back. On COCO this drops most of the vocabulary
(rare words of the web-scale CLIP corpus); on the demo data it makes the LM head 700x smaller.
`vocab="full"` keeps the official layout (compact id == CLIP id), which is what the released
DiCO checkpoint needs.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

CLIP_BOS = 49406
CLIP_EOS = 49407
CLIP_PAD = 49408  # the id the official code appends to CLIP's 49,408 tokens
CLIP_VOCAB = 49409


class ClipBPE:
    """CLIP's byte-level BPE over open_clip's bundled merges file, without importing open_clip
    (whose import pulls in timm and torchvision: ~4 s per process, paid by every pipeline job).

    The algorithm of Radford et al. (2021): clean (ftfy, HTML unescape, collapse whitespace,
    lower-case), split into words / single digits / punctuation runs, map each word's UTF-8 bytes
    to printable characters, append the end-of-word marker to the last one, then merge adjacent
    pairs in merge-rank order. Ids: 256 byte symbols, their 256 end-of-word forms, 48,894 merges,
    then <start_of_text> = 49406 and <end_of_text> = 49407. Checked token-for-token against
    open_clip's SimpleTokenizer in tests/test_tokenizer.py.
    """

    N_MERGES = 49152 - 256 - 2

    def __init__(self):
        import gzip
        import importlib.util

        import regex

        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("open_clip_torch is not installed: it ships the CLIP BPE vocabulary")
        merges_file = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(merges_file).read().decode("utf-8").split("\n")[1:self.N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_to_char = _byte_symbols()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        symbols = list(self.byte_to_char.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.tokens = vocab
        self.rank = {m: i for i, m in enumerate(merges)}
        self.pattern = regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {}

    @staticmethod
    def clean(text: str) -> str:
        import html

        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _merge(self, word: str) -> list[str]:
        """BPE of one word (already mapped to byte symbols)."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.rank.get((a, b), None), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            ranked = [(r, i) for r, i in ranked if r is not None]
            if not ranked:
                break
            best = min(ranked)[0]
            pair = next((a, b) for a, b in zip(parts, parts[1:]) if self.rank.get((a, b)) == best)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        out = []
        for word in self.pattern.findall(self.clean(text)):
            if word in ("<start_of_text>", "<end_of_text>"):
                out.append(self.ids[word])
                continue
            symbols = "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
            out += [self.ids[p] for p in self._merge(symbols)]
        return out

    def decode(self, ids) -> str:
        """Text of BPE ids: bytes back from their symbols, each end-of-word marker a space."""
        text = "".join(self.tokens[i] for i in ids)
        raw = bytearray(self.char_to_byte[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


def _byte_symbols() -> dict[int, str]:
    """A printable character for every byte: printable Latin-1 bytes stand for themselves, the
    others (controls, space, ...) are shifted to code points 256+, so no BPE symbol is whitespace.
    Printable bytes come first: this order is the order of the first 256 vocabulary ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


@lru_cache(maxsize=1)
def _bpe() -> ClipBPE:
    return ClipBPE()


def clip_encode(text: str) -> list[int]:
    """CLIP BPE ids of a caption, without BOS/EOS (lower-cased, punctuation split off)."""
    return _bpe().encode(text)


class CaptionTokenizer:
    """Maps captions to padded id tensors and back.

    `clip_ids` is the sorted list of CLIP ids the model predicts; its position is the model id.
    BOS, EOS and PAD are always part of it.
    """

    def __init__(self, clip_ids: Sequence[int] | None = None):
        if clip_ids is None:
            clip_ids = range(CLIP_VOCAB)
        ids = sorted(set(int(i) for i in clip_ids) | {CLIP_BOS, CLIP_EOS, CLIP_PAD})
        self.clip_ids: list[int] = ids
        self._to_model = {c: m for m, c in enumerate(ids)}
        self.bos_id = self._to_model[CLIP_BOS]
        self.eos_id = self._to_model[CLIP_EOS]
        self.pad_id = self._to_model[CLIP_PAD]

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, vocab: str, train_captions: Iterable[str] = ()) -> "CaptionTokenizer":
        """`vocab="full"`: all 49,409 ids. `vocab="train"`: the ids used by `train_captions`."""
        if vocab == "full":
            return cls()
        if vocab == "train":
            used: set[int] = set()
            for caption in train_captions:
                used.update(clip_encode(caption))
            if not used:
                raise ValueError("vocab='train' needs training captions, got none")
            return cls(sorted(used))
        raise ValueError(f"model.vocab must be 'full' or 'train', got {vocab!r}")

    def state_dict(self) -> dict:
        full = len(self.clip_ids) == CLIP_VOCAB
        return {"clip_ids": None if full else list(self.clip_ids)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "CaptionTokenizer":
        return cls(state.get("clip_ids"))

    @property
    def vocab_size(self) -> int:
        return len(self.clip_ids)

    # -- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str, max_len: int) -> list[int]:
        """[BOS, w_1 .. w_n, EOS] in model ids, truncated so that it fits `max_len` (EOS kept).

        BPE tokens outside a compact vocabulary are dropped (they cannot be predicted anyway).
        """
        if max_len < 2:
            raise ValueError("max_len must leave room for BOS and EOS")
        body = [self._to_model[c] for c in clip_encode(text) if c in self._to_model]
        return [self.bos_id] + body[: max_len - 2] + [self.eos_id]

    def batch_encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """LongTensor [N, L] with L = longest encoded caption (<= max_len), padded with pad_id."""
        rows = [self.encode(t, max_len) for t in texts]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    def body(self, ids: Sequence[int]) -> list[int]:
        """Model ids between BOS and the first EOS (pads and specials removed)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                continue
            out.append(i)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Caption text of one id sequence, stopping at EOS."""
        clip = [self.clip_ids[i] for i in self.body(ids)]
        return _bpe().decode(clip).strip()

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in ids.tolist()]
