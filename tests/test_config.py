import pytest

from dico import config as C

DEMO = "config/config.yaml"


def test_demo_config_validates_and_fills_defaults():
    cfg = C.load(DEMO)
    assert cfg["dico"]["beta"] == 0.2 and cfg["dico"]["tau"] == 300 and cfg["dico"]["k"] == 5
    assert cfg["evaluate"]["pac_s"] == {"model": "pac", "w": 2.0, "prefix": "A photo depicts "}
    assert cfg["rewards"]["pac_s"] == {"type": "clip", "model": "pac", "w": 2.0, "prefix": "", "clamp": False, "input": "ids"}


def test_runs_and_ablation_points():
    cfg = C.load(DEMO, {"ablations": {"beta": [0.1, 0.2], "tau": [300], "k": [3], "reward": ["pac_s"]}})
    assert C.runs(cfg) == ["xe", "scst_cider", "scst_clip_s", "scst_pac_s", "dico", "dico_beta-0.1", "dico_k-3"]
    spec = C.run_spec(cfg, "dico_beta-0.1")
    assert spec["method"] == "dico" and spec["dico"]["beta"] == 0.1 and spec["dico"]["tau"] == 300
    assert set(spec["clip_models"]) == {"pac", "clip"}
    assert C.run_spec(cfg, "scst_cider")["reward"]["type"] == "cider"
    with pytest.raises(C.ConfigError, match="not in the ablation grid"):
        C.run_spec(cfg, "dico_beta-0.7")
    with pytest.raises(C.ConfigError, match="unknown run"):
        C.run_spec(cfg, "ppo")


def test_run_spec_holds_only_what_the_run_needs():
    cfg = C.load(DEMO)
    before = C.run_spec(cfg, "xe")
    changed = C.load(DEMO, {"evaluate": {"meteor": False}, "report": {"qualitative_images": 3}})
    assert C.run_spec(changed, "xe") == before  # editing metrics/report settings does not retrain


@pytest.mark.parametrize("override,message", [
    ({"dico": {"beta": -1}}, r"dico.beta: -1 is less than or equal to the minimum of 0"),
    ({"dico": {"betta": 1}}, r"dico: unknown key 'betta'; allowed keys: batch_images, beta"),
    ({"evaluate": {"splits": ["train"]}}, r"evaluate.splits.0: 'train' is not allowed; choose one of 'val', 'test'"),
    ({"device": "tpu"}, r"device: 'tpu' is not allowed"),
    ({"dico": {"reward": "bleu"}}, r"dico.reward: 'bleu' is not a rewards entry"),
    ({"features": {"backbone": "vit"}}, r"features.backbone: 'vit' is not a clip_models entry"),
])
def test_bad_config_names_key_and_fix(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(DEMO, override)


def test_every_schema_property_is_described():
    def walk(node, path):
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                assert "description" in sub, f"{path}.{name} has no description"
                walk(sub, f"{path}.{name}")
            if isinstance(node.get("additionalProperties"), dict):
                walk(node["additionalProperties"], f"{path}.*")
    walk(C.schema(), "config")


def test_defaults_are_not_shared_between_configs():
    cfg1 = C.load(DEMO)
    cfg2 = C.load(DEMO)
    cfg1["rewards"]["pac_s"]["w"] = 99
    assert cfg2["rewards"]["pac_s"]["w"] == 2.0
