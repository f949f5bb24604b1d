"""Tiny end-to-end worlds for the tests: demo images, a split file and a random tiny CLIP."""
from dico.data import normalise_karpathy
from dico.demo import make_demo_data
from dico.demo_clip import build_tiny_clip, tiny_clip_config
from dico.evaluator import load_evaluator, save_evaluator


def tiny_world(root, *, n_train: int, n_val: int, n_test: int, seed: int, image_size: int = 32):
    """Writes root/demo (JPEGs + Karpathy file), root/splits.json and root/clip.pt (a random
    32-px CLIP: patch 8, one 64-wide layer per tower); returns the loaded evaluator."""
    karpathy = make_demo_data(root / "demo", n_train=n_train, n_val=n_val, n_test=n_test,
                              image_size=image_size, seed=seed)
    normalise_karpathy(karpathy, root / "demo" / "images", root / "splits.json")
    cfg = tiny_clip_config(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                           text_width=64, text_layers=1, context_length=32)
    save_evaluator(build_tiny_clip(cfg, seed=0), root / "clip.pt")
    return load_evaluator(root / "clip.pt")


def sigterm_at_step(monkeypatch, step: int) -> None:
    """Make the training loop see SIGTERM after `step` steps (its stop flag is read once per step), as
    SLURM's preemption would; monkeypatch.undo() or the test's end restores the real flag."""
    from dico import runtime

    calls = {"n": 0}

    class FlagAfter(runtime.StopFlag):
        @property
        def requested(self):
            calls["n"] += 1
            return calls["n"] == step

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(runtime, "StopFlag", FlagAfter)

