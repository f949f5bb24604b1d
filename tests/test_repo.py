"""The repository's promises: README set-up commands, CI, lint, pinned per-step envs, dry-run DAG."""
import re
import subprocess
from pathlib import Path

import yaml
from worlds import copy_workflow

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


def _snakemake(*args, cwd=ROOT):
    return subprocess.run(["snakemake", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_rule_has_log_and_conda(tmp_path):
    """Snakemake's own rules, however they are written (plain, `use rule ... with`, indented under an
    `if`, generated in a loop): its linter flags any rule without a log or a conda env, for the demo
    and the paper config; every env a rule names exists. The check reaches every kind of rule: with the
    log of a generated rule (download_clip), of a `use rule` copy (train_dico inherits train_scst's:
    dropped from both) and of an indented one (gather_features) removed, the linter names each."""
    for config in ([], ["--configfile", "config/paper.yaml"]):
        rules = _snakemake("--list-rules", *config).stdout.split()
        assert {"generate", "evaluate", "train_dico", "download_all"} <= set(rules) or not config
        out = _snakemake("--lint", *config)
        assert out.returncode == 0, out.stdout + out.stderr
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            assert (smk.parent / env).resolve().is_file(), f"{smk.name}: {env} missing"

    copy = copy_workflow(tmp_path / "repo")
    rules = copy / "workflow" / "rules"
    for smk, log in (("download.smk", 'L.log("download", _d["name"])'), ("train.smk", 'L.log("train", "{run}")'),
                     ("features.smk", 'L.log("cache_features", "{split}.gather")')):
        text = (rules / smk).read_text()
        assert log in text
        (rules / smk).write_text(re.sub(r"\n\s*log:\n\s*" + re.escape(log) + r",", "", text))
    config = yaml.safe_load((copy / "config" / "paper.yaml").read_text())
    config.setdefault("features", {})["jobs"] = 2
    (copy / "config" / "lint.yaml").write_text(yaml.safe_dump(config))
    out = _snakemake("--lint", "--configfile", "config/lint.yaml", cwd=copy)
    assert out.returncode != 0
    for rule in ("download_clip", "train_scst", "train_dico", "gather_features"):
        assert re.search(rf"Lints for rule {rule} \(.*\n\s+\* No log directive defined", out.stdout + out.stderr), rule


def test_envs_parse_and_pin_every_dependency():
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert {e.stem for e in envs} >= {"data", "features", "train", "eval", "report"}
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        assert spec["channels"][-1] == "nodefaults", env.name
        for dep in spec["dependencies"]:
            pins = dep["pip"] if isinstance(dep, dict) else [dep]
            for pin in pins:
                if pin.startswith("-e ${DICO_CHECKOUT}"):
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
    for rule in ("make_demo_data", "prepare_splits", "train_clip", "cache_features", "cache_embeddings_splits",
                 "train_xe", "train_scst", "train_dico", "generate_runs", "evaluate_runs", "table_main",
                 "table_ablation", "figure_training_curves"):
        assert int(counts.get(rule, 0)) >= 1, f"{rule} not planned:\n{out.stdout}"
    assert int(counts["train_scst"]) == 3
    # the demo captions and scores all runs in one job each and embeds COCO's splits in one job per model
    # (evaluate.group_runs): train for the rewards, val for validation, test for the scorers
    assert (int(counts["generate_runs"]), int(counts["evaluate_runs"]), int(counts["cache_embeddings_splits"])) \
        == (1, 1, 2)
    assert "generate" not in counts and "evaluate" not in counts and "cache_embeddings" not in counts


def test_the_module_map_and_the_docs_name_what_exists():
    """dico/__init__.py maps every module of the library and nothing else; every `dico.<module>...`
    that README.md, docs/ and the library's docstrings name can be imported (a config key such as
    `dico.beta`, of the config's `dico` section, is not a module; docs/architecture.md's table of where
    things moved names the old modules on purpose)."""
    import importlib

    import dico
    from dico import config as C

    on_disk = {p.stem if p.suffix == ".py" else p.name for p in (ROOT / "dico").iterdir()
               if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").exists()}
    mapped = set(re.findall(r"^    (\w+)/?\s{2,}\S", dico.__doc__, re.M))
    assert mapped == on_disk, f"dico/__init__.py maps {sorted(mapped - on_disk)} that do not exist and misses " \
                              f"{sorted(on_disk - mapped)}"
    config_keys = set(C.schema()["properties"]["dico"]["properties"])
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "dico").rglob("*.py")]
    stale = []
    for path in texts:
        text = path.read_text().split("## Where things moved")[0]
        for ref in set(re.findall(r"\bdico(?:\.[A-Za-z_]\w*)+", text)):
            parts = ref.split(".")
            if parts[1] in config_keys or parts[1] in ("yaml", "log", "py"):  # a config key or a file name
                continue
            obj, i = importlib.import_module("dico"), 1
            while i < len(parts):
                name = ".".join(parts[: i + 1])
                try:
                    obj = getattr(obj, parts[i]) if hasattr(obj, parts[i]) else importlib.import_module(name)
                except ImportError:
                    stale.append(f"{path.relative_to(ROOT)}: {ref}")
                    break
                i += 1
    assert not stale, stale


def test_the_figures_and_commands_the_docs_quote_are_the_tools_own():
    """The paper plan's job count in docs/cluster.md is what `snakemake -n --profile slurm` plans; every
    `dico <command>` the README and docs show is a command of `dico`, every `snakemake ... <target>` a rule."""
    from dico import cli

    out = _snakemake("-n", "--profile", "slurm", "--quiet", "rules")
    total = int(re.search(r"^total\s+(\d+)$", out.stdout + out.stderr, re.M).group(1))
    cluster = (ROOT / "docs" / "cluster.md").read_text()
    quoted = re.findall(r"(\d+) jobs \(`snakemake -n --profile slurm`\)|the plan: (\d+) jobs", cluster)
    quoted = [a or b for a, b in quoted]  # the cost table's total and the commands' comment
    assert quoted and set(map(int, quoted)) == {total}, (quoted, total)

    commands = set(cli.build_parser()._actions[-1].choices)
    rules = set(_snakemake("--list-rules", "--configfile", "config/paper.yaml").stdout.split())
    with_value = {"--cores", "--profile", "--configfile", "--config", "--set-resources", "--report", "-j", "--jobs",
                  "--sdm", "--software-deployment-method"}
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in re.split(r"\n|&&", block.replace("\\\n", " ")):
                words = line.split("#")[0].split()
                if words[:1] == ["dico"]:
                    assert words[1] in commands, f"{doc.name}: `{line.strip()}`: no command {words[1]!r}"
                if words[:1] == ["snakemake"]:
                    targets = [w for prev, w in zip(words, words[1:]) if not w.startswith("-") and "=" not in w
                               and prev not in with_value and not w.startswith("&")]
                    assert set(targets) <= rules, f"{doc.name}: `{line.strip()}`: {set(targets) - rules}"
