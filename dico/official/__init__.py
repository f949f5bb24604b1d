"""The released DiCO checkpoint (aimagelab/DiCO, "dico-ViTL14") as one of our captioner checkpoints,
and back.

    dico convert-official --src resources/weights/dico-ViTL14.zip --out results/runs/dico_official/model.pt
    dico export-official --checkpoint results/runs/dico/model.pt --out DIR [--zip] [--backbone-checkpoint ViT-L-14.pt]

    release   reading a release (folder, archive or bare weights file) and the safety of its pickles
    mapping   its config and tensor names against ours, both ways
    convert   release -> our checkpoint (run `dico_official`), written or in memory (`dico caption --official`)
    export    our checkpoint -> the release's layout, which runs in the `transformers` classes

`convert(export(x)) == x` exactly (tests/test_official.py).
"""
from .convert import RUN, convert, official_payload
from .export import export, vision_tower
from .mapping import IGNORED, captioner_config, convert_state_dict, key_map, official_state_dict, release_config
from .release import generation_overrides, load_release

__all__ = ["IGNORED", "RUN", "captioner_config", "convert", "convert_state_dict", "export", "generation_overrides",
           "key_map", "load_release", "official_payload", "official_state_dict", "release_config", "vision_tower"]
