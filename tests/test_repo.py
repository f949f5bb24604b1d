"""The repository's promises: README set-up commands, CI, lint, pinned per-step envs, dry-run DAG."""
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up and run.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("snakemake --cores all") and "pip install -e '.[all]'" in demo
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_snakemake_lint_is_clean():
    out = subprocess.run(["snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_shell_rule_has_log_and_conda():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, re.M):
            if "shell:" in body:
                assert "log:" in body, f"{smk.name}: rule {name} has no log:"
                assert "conda:" in body, f"{smk.name}: rule {name} has no conda:"
                env = re.search(r'conda:\s*\n\s*"([^"]+)"', body).group(1)
                assert (smk.parent / env).resolve().exists(), f"{smk.name}: rule {name}: {env} missing"


def test_envs_parse_and_pin_every_dependency():
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert {e.stem for e in envs} >= {"data", "features", "train", "eval", "report"}
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        assert spec["channels"][-1] == "nodefaults", env.name
        for dep in spec["dependencies"]:
            pins = dep["pip"] if isinstance(dep, dict) else [dep]
            for pin in pins:
                if pin.startswith("-e .."):
                    continue  # this checkout
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][\w.]*", pin), f"{env.name}: {pin!r} is not pinned with =="
    eval_env = yaml.safe_load((ROOT / "envs" / "eval.yaml").read_text())
    assert any(str(d).startswith("openjdk==") for d in eval_env["dependencies"])


def test_env_pins_match_the_package_pins():
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"([A-Za-z0-9_.\-]+)==([^"]+)"', pyproject))
    for env in (ROOT / "envs").glob("*.yaml"):
        for dep in yaml.safe_load(env.read_text())["dependencies"]:
            for pin in dep["pip"] if isinstance(dep, dict) else []:
                name, _, version = pin.partition("==")
                if name in pins:
                    assert pins[name] == version, f"{env.name}: {name} {version} != pyproject {pins[name]}"


def test_dry_run_plans_every_stage():
    out = subprocess.run(["snakemake", "-n", "-F", "--quiet", "rules"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout + out.stderr, re.M))
    for rule in ("make_demo_data", "prepare_splits", "train_clip", "cache_features", "cache_embeddings",
                 "train_xe", "train_scst", "train_dico", "generate_runs", "evaluate_runs", "table_main",
                 "table_ablation", "figure_training_curves"):
        assert int(counts.get(rule, 0)) >= 1, f"{rule} not planned:\n{out.stdout}"
    assert int(counts["train_scst"]) == 3
    # the demo captions and scores all runs in one job each (evaluate.group_runs), one embeddings job per model
    assert (int(counts["generate_runs"]), int(counts["evaluate_runs"]), int(counts["cache_embeddings"])) == (1, 1, 2)
    assert "generate" not in counts and "evaluate" not in counts
