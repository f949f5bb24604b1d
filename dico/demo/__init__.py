"""The embedded demo: generated scenes of coloured shapes with five captions each, and the tiny CLIP
stand-ins trained on them, so that the paper's whole DAG runs on a laptop CPU in minutes.

    scenes      the scenes (one to three shapes on a 3 x 3 grid) and how they are drawn
    captions    the caption templates: five varied references per scene
    language    the templates' language: `grammatical` (fluency), `describes` (truth), `swapped`
    negatives   hard negatives for the PAC-S stand-in (a caption wrong in one detail)
    dataset     the data set on disk (Karpathy schema), in-memory pretraining pairs, a split's scenes
    clip        the CLIP stand-ins: architecture, the compact token table, contrastive training
    retrieval   what a stand-in sees: retrieval R@1 by truth and by text, the swap test

Nothing outside this package imports it: the CLI passes the demo's measures (the fluency of
`language.grammatical`) to the general modules as parameters. The names below are the light,
torch-free part of the demo (the CLIP stand-ins live in `dico.demo.clip`).
"""
from .captions import RELATION_WORDS, SHAPE_WORDS, SIZE_WORDS, caption, captions
from .dataset import JPEG_QUALITY, grammar_of, make_demo_data, pretraining_pairs, split_scenes
from .language import describes, grammatical, swapped
from .negatives import hard_negative_words, perturb_caption
from .scenes import (BACKGROUNDS, COLOURS, SHAPES, SIZES, UNSEEN_BACKGROUNDS, UNSEEN_COLOURS, VARIANTS, Scene, Shape,
                     cell, position, random_scene, relation, render, scene_from_json, scene_json)

__all__ = ["BACKGROUNDS", "COLOURS", "JPEG_QUALITY", "RELATION_WORDS", "SHAPES", "SHAPE_WORDS", "SIZES", "SIZE_WORDS",
           "UNSEEN_BACKGROUNDS", "UNSEEN_COLOURS", "VARIANTS", "Scene", "Shape", "caption", "captions", "cell",
           "describes", "grammar_of", "grammatical", "hard_negative_words", "make_demo_data", "perturb_caption",
           "position", "pretraining_pairs", "random_scene", "relation", "render", "scene_from_json", "scene_json",
           "split_scenes", "swapped"]
