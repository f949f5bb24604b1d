"""The paper config is the official algorithm, row by row of docs/fidelity.md: every value below is
what the official code (aimagelab/DiCO 7a2f740, the file named with it) runs. A row switched back to
another behaviour fails here even where no behaviour test runs; the behaviour tests named in the
ledger prove each row against an independent reference."""
import re
from pathlib import Path

import pytest

from dico import config as C

ROOT = Path(__file__).resolve().parents[1]

OFFICIAL = [  # (config key, official value, where the official code sets it)
    ("features.backbone", "clip_l14", "main.py CLIP_BACKBONE openai/clip-vit-large-patch14"),
    ("features.amp", "fp16", "scripts/*.sh --fp16 --fp16_full_eval"),
    ("features.dtype", "float16", "ours: fp16 storage of fp16 features"),
    ("model.d_model", 512, "main.py --n_embd 512"),
    ("model.enc_layers", 3, "main.py BertConfig(num_hidden_layers=n_layer)"),
    ("model.dec_layers", 3, "main.py --n_layer 3"),
    ("model.n_heads", 8, "main.py --n_head 8"),
    ("model.d_ff", 2048, "main.py BertConfig(intermediate_size=2048); GPT-2 4 x n_embd"),
    ("model.dropout", 0.1, "transformers GPT2Config / BertConfig defaults"),
    ("model.vocab", "full", "main.py tokenizer.vocab_size + 1"),
    ("model.max_caption_tokens", 77, "main.py process_sample max_length=77"),
    ("model.max_dec_positions", 1024, "GPT2Config n_positions"),
    ("xe.steps", 10000, "scripts/train_xe_coco.sh --max_steps"),
    ("xe.batch_size", 64, "scripts/train_xe_coco.sh per-device batch on WORLD_SIZE=1"),
    ("xe.grad_accum", 8, "scripts/train_xe_coco.sh --gradient_accumulation_steps"),
    ("xe.lr", 2.5e-4, "scripts/train_xe_coco.sh --learning_rate"),
    ("xe.warmup_ratio", 0.05, "scripts/train_xe_coco.sh --warmup_ratio"),
    ("xe.val_every", 200, "scripts/train_xe_coco.sh --eval_steps"),
    ("xe.select_by", "CIDEr", "scripts/train_xe_coco.sh --metric_for_best_model cider"),
    ("xe.captions_per_image", None, "datasets.json: one (image, caption) pair per sample"),
    ("xe.patience", None, "no early-stopping callback"),
    ("dico.steps", 250000, "scripts/train_dico_coco.sh --max_steps"),
    ("dico.val_every", 1770, "scripts/train_dico_coco.sh --eval_steps"),
    ("dico.batch_images", 16, "scripts/train_dico_coco.sh 8 per GPU x 2 GPUs"),
    ("dico.lr", 1.0e-6, "scripts/train_dico_coco.sh --learning_rate, constant"),
    ("dico.k", 5, "trainers/dico_trainer.py num_return_sequences = num_beams"),
    ("dico.beta", 0.2, "main.py --dico_beta"),
    ("dico.tau", 300, "main.py --dico_tau"),
    ("dico.reward", "pac_s", "trainers/trainer_utils.py TrainerRewardModel (PAC-S)"),
    ("dico.select_by", "RefPAC-S", "scripts/train_dico_coco.sh --metric_for_best_model ref-PACScore"),
    ("dico.patience", None, "no early-stopping callback"),
    ("dico.generation_mode", "train", "HF Trainer keeps the policy in train() around its beam search"),
    ("rewards.pac_s.w", 2.0, "utils.py compute_clip_score(w=2.0)"),
    ("rewards.pac_s.prefix", "", "utils.py compute_clip_score: the ids as generated"),
    ("rewards.pac_s.clamp", False, "utils.py compute_clip_score: no clamp"),
    ("rewards.pac_s.input", "ids", "utils.py compute_clip_score: generated ids, pad -> 0"),
    ("clip_models.pac.path", "resources/weights/clip_ViT-B-32.pth", "trainers/trainer_utils.py load_pacs"),
    ("train.amp", "fp16", "scripts/*.sh --fp16 --fp16_full_eval"),
    ("train.loss_scale.initial", 65536, "configs/config_adam_zero2.json initial_scale_power 16"),
    ("train.loss_scale.window", 1000, "configs/config_adam_zero2.json loss_scale_window"),
    ("train.loss_scale.hysteresis", 2, "configs/config_adam_zero2.json hysteresis"),
    ("train.loss_scale.min", 1, "configs/config_adam_zero2.json min_loss_scale"),
    ("train.max_grad_norm", None, "configs/config_adam_zero2.json: no gradient_clipping"),
    ("train.val_images", None, "the whole coco_validation set"),
    ("selection.include_start", False, "HF Trainer evaluates at multiples of eval_steps only"),
    ("selection.form", "validation", "utils.py clip_score_from_predictions / compute_clip_score(ref=True)"),
    ("decoding.style", "hf", "utils.py generate_with_backpropagation; transformers 4.20 beam search"),
    ("decoding.beam_size", 5, "scripts/*.sh --generation_num_beams 5"),
    ("decoding.max_len", 30, "scripts/*.sh --generation_max_length 30"),
    ("decoding.length_penalty", 1.0, "transformers default, not set by the scripts"),
    ("decoding.postprocess", "official", "utils.py save_predictions / postprocess_text"),
    ("evaluate.clip_s.w", 2.5, "CLIP-S (Hessel et al. 2021)"),
    ("evaluate.pac_s.w", 2.0, "pacscore pac_score.py"),
    ("evaluate.pac_s.prefix", "A photo depicts ", "pacscore compute_metrics.py"),
    ("official.trust_pickle", False, "files from the internet are data, not code"),
]


def _get(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.fixture(scope="module")
def paper():
    return C.load(ROOT / "config" / "paper.yaml")


@pytest.mark.parametrize("key,value,source", OFFICIAL, ids=[k for k, _, _ in OFFICIAL])
def test_paper_config_is_the_official_value(paper, key, value, source):
    assert _get(paper, key) == value, f"{key}: the official code has {value!r} ({source})"


@pytest.mark.parametrize("key,value,source", OFFICIAL, ids=[k for k, _, _ in OFFICIAL])
def test_the_demo_differs_only_in_sizes_steps_and_data(key, value, source):
    """The demo may change sizes, steps and data, never a code path: every non-size row is the
    paper's in config/config.yaml too."""
    sizes = re.compile(r"^(features\.backbone|model\.(d_model|enc_layers|dec_layers|n_heads|d_ff|vocab|"
                       r"max_caption_tokens|max_dec_positions)|xe\.(steps|batch_size|grad_accum|lr|val_every|"
                       r"captions_per_image|warmup_ratio)|dico\.(steps|val_every|batch_images|lr)|clip_models\..*|"
                       r"train\.val_images)$")
    if sizes.match(key):
        pytest.skip("a size, step count or data choice: the demo sets its own")
    demo = C.load(ROOT / "config" / "config.yaml")
    assert _get(demo, key) == value, f"config/config.yaml changes {key}, which is not a size, step or data"


def test_every_ledger_test_exists():
    """The tests docs/fidelity.md names are real tests of the suite."""
    ledger = (ROOT / "docs" / "fidelity.md").read_text()
    named = set(re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", ledger))
    files = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    missing = []
    for path, name in sorted(named):
        target = [path] if path else list(files)
        if not any(f"def {name}(" in files.get(f, "") for f in target):
            missing.append(f"{path}::{name}" if path else name)
    assert not missing, f"docs/fidelity.md names tests that do not exist: {missing}"
