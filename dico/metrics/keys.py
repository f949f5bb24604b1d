"""The names of the metrics, in one place.

`METRICS` maps each metric `dico score --metrics` can name to the keys it writes; every key in the
order of the paper's tables is `KEYS`. A metrics JSON (`dico evaluate`, `dico score --out`) holds
`TABLE_KEYS` in its `metrics` block and BLEU-2 / BLEU-3 (`EXTRA_KEYS`) in its `extra` block.
"""
METRICS = {"bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"), "meteor": ("METEOR",), "rouge": ("ROUGE-L",),
           "cider": ("CIDEr",), "spice": ("SPICE",), "clip-s": ("CLIP-S",), "refclip-s": ("RefCLIP-S",),
           "pac-s": ("PAC-S",), "refpac-s": ("RefPAC-S",)}
COCO_SUITE = ("bleu", "meteor", "rouge", "cider", "spice")  # pycocoevalcap's scorers (Java)
CLIP_FAMILY = {"clip-s": "CLIP-S", "pac-s": "PAC-S"}  # each with its Ref- variant (refclip-s, refpac-s)

KEYS = tuple(k for keys in METRICS.values() for k in keys)
COCO_KEYS = tuple(k for m in COCO_SUITE for k in METRICS[m])
EXTRA_KEYS = ("BLEU-2", "BLEU-3")
TABLE_KEYS = tuple(k for k in KEYS if k not in EXTRA_KEYS)
