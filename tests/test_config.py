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
    ({"clip_models": {"pac": {"train": {"init": "pac"}}}},
     r"clip_models.pac.train.init: 'pac' is not another demo clip_models entry \(have: clip\)"),
    ({"clip_models": {"pac": {"train": {"vision_width": 64}}}},
     r"clip_models.pac.train.init: pac starts from clip's weights, so its architecture must be clip's; "
     r"set clip_models.pac.train.vision_width to 128"),
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


def test_seeds_add_one_run_per_main_run_and_extra_seed():
    cfg = C.load(DEMO, {"seeds": [0, 1, 2], "ablations": {"beta": [0.1, 0.2], "tau": [300], "k": [5], "reward": ["pac_s"]}})
    main = ["xe", "scst_cider", "scst_clip_s", "scst_pac_s", "dico"]
    assert C.runs(cfg) == main + ["dico_beta-0.1"] + [f"{r}_seed{s}" for s in (1, 2) for r in main]
    assert C.runs(cfg, all_seeds=False) == main + ["dico_beta-0.1"]  # ablations: one seed
    for run in main:  # the same settings, another training seed
        assert C.run_spec(cfg, f"{run}_seed2") == {**C.run_spec(cfg, run), "run": f"{run}_seed2", "seed": 2}
    assert C.xe_run_of(cfg, "dico_seed2") == "xe_seed2" and C.xe_run_of(cfg, "scst_cider") == "xe"
    for bad in ("dico_seed3", "dico_seed0", "dico_beta-0.1_seed1"):  # not a seed of seeds / not a main run
        with pytest.raises(C.ConfigError, match="seeded runs are"):
            C.run_spec(cfg, bad)
    with pytest.raises(C.ConfigError, match=r"seeds \[1, 2\] must include seed \(0\)"):
        C.runs(C.load(DEMO, {"seeds": [1, 2]}))
    assert C.runs(C.load(DEMO)) == C.runs(C.load(DEMO), all_seeds=False)  # default: one seed


def test_seeds_plan_through_snakemake(tmp_path):
    """`snakemake --config seeds=[0,1,2]` (lists arrive as strings) plans 3 XE runs, fine-tunes each
    seed from its own XE model and puts every seed's metrics into the main table."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-F", "-p", "--nolock", "results/tables/main.tex",
                          "--config", "seeds=[0,1,2]"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    runs = set(re.findall(r"(?:dico|torchrun \S+ \S+ -m dico) train (\S+) ", text))
    main = {"xe", "scst_cider", "scst_clip_s", "scst_pac_s", "dico"}
    seeded = main | {f"{r}_seed{s}" for r in main for s in (1, 2)}
    # the ablation runs too, at one seed: the demo scores all runs in one job (evaluate.group_runs)
    assert runs == seeded | {"dico_beta-0.05", "dico_beta-1", "dico_tau-1", "dico_k-3", "dico_reward-clip_s"}
    inits = dict(re.findall(r" train (\S+) .*?--init results/runs/(\S+)/model\.pt", text))
    assert inits == {r: "xe" if "_seed" not in r else "xe_" + r.rsplit("_", 1)[1]
                     for r in runs if r not in ("xe", "xe_seed1", "xe_seed2")}
    table = re.search(r"dico report table-main .*?--metrics (.*?) --splits", text).group(1).split()
    assert sorted(table) == sorted(f"results/metrics/{r}/test.json" for r in seeded)


def test_a_mistyped_input_path_fails_at_parse_time_instead_of_becoming_a_download(tmp_path):
    """COCO's inputs are downloaded only to the schema's paths: a config that moves one to a path that
    does not exist fails when it is read (by `dico` and by `snakemake -n`), naming the key."""
    import subprocess

    typo = {"data": {"karpathy_json": "resources/coco/datset_coco.json"}}
    with pytest.raises(C.ConfigError, match=r"data.karpathy_json: resources/coco/datset_coco.json does not exist; "
                                            r"correct the path .* fetches it to resources/coco/dataset_coco.json"):
        C.load("config/paper.yaml", typo)
    (tmp_path / "typo.yaml").write_text("data: {karpathy_json: resources/coco/datset_coco.json}\n")
    out = subprocess.run(["snakemake", "-n", "--configfile", "config/paper.yaml", str(tmp_path / "typo.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "data.karpathy_json: resources/coco/datset_coco.json does not exist" in out.stdout + out.stderr
    (tmp_path / "mine.json").write_text("{}")  # a copy of one's own, wherever it is, is taken as it is
    assert C.load("config/paper.yaml", {"data": {"karpathy_json": str(tmp_path / "mine.json")}})
