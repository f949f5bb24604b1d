"""The per-step conda envs (envs/*.yaml) resolve, and each holds what its steps import.

Conda's channels cannot be reached from the build machines, but PyPI can, and the pip section is where
every Python package of an env comes from. So, for each env:

- its pip section is resolved by pip's own resolver in a dry run (nothing is installed), the way conda
  runs it: conda writes the section to a requirements file beside its copy of the env file and runs pip
  there; Snakemake puts that copy under the conda prefix, not in envs/. Resolved for the env's conda
  pin of Python, against PyPI alone (this machine's pip configuration, local indexes and constraints,
  is left out, as it is on a cluster), wheels only (a compute node has no compilers);
- the `dico` commands its rules run (Snakemake's own view of the workflow, for the demo and the paper
  config) are read with `ast`: the modules `dico` imports when it starts, then everything the command's
  CLI module imports, at the top or inside a function, followed through dico's own modules; every
  third-party module reached must come from a distribution the env pins (its pip section, or the extra
  of this checkout it installs).

Without network access to PyPI the resolution is skipped with the reason; the import check still runs.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
PYPI = "https://pypi.org/simple/"
# pip >= 26.3 (the test extra's pin) reads a wheel's metadata alone (PEP 658 files, else HTTP range
# requests: fast-deps) and, in a dry run, never downloads the wheel itself; pip 23.2.1, the envs' own pip,
# would fetch every wheel in full (about 3 GB for an env with torch and its CUDA libraries).
PIP_MIN = (26, 3)

# Loads the workflow with Snakemake's API (run in a subprocess: Snakemake's logging and the Snakefile's
# globals stay out of pytest) and prints each rule's env, shell command and the text behind each of its
# params (a function's string constants, else its value), plus the DICO_CHECKOUT the Snakefile exports for the envs.
RULES_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

def strings(code):  # a function's string constants, its nested functions' too (its source is the Snakefile's)
    return [s for c in code.co_consts for s in (strings(c) if hasattr(c, "co_consts") else [c]) if isinstance(s, str)]

def text(value):
    return " ".join(strings(value.__code__)) if hasattr(value, "__code__") else str(value)

with SnakemakeApi(OutputSettings()) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(), storage_settings=StorageSettings(),
                            config_settings=ConfigSettings(configfiles=[Path(p) for p in sys.argv[1:]]),
                            snakefile=Path("Snakefile"), workdir=Path("."))._workflow
    rules = {r.name: {"env": str((Path(r.basedir) / r.conda_env).resolve()) if r.conda_env else None,
                      "shell": r.shellcmd, "params": {k: text(v) for k, v in r.params._allitems()}}
             for r in workflow.rules}
print(json.dumps({"checkout": os.environ.get("DICO_CHECKOUT"), "rules": rules}))
"""


# --- the envs -------------------------------------------------------------------------------------

def env_spec(path: Path) -> tuple[str, list[str]]:
    """(the conda pin of Python, the pip section) of an env file."""
    deps = yaml.safe_load(path.read_text())["dependencies"]
    python = [d.split("==", 1)[1] for d in deps if isinstance(d, str) and d.startswith("python==")]
    assert len(python) == 1, f"{path.name}: pin Python with one `python==X.Y.Z`"
    pip = [line for d in deps if isinstance(d, dict) for line in d.get("pip", [])]
    return python[0], pip


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def checkout_extras(pip_lines: list[str]) -> set[str]:
    """The extras of this checkout an env installs (`-e ${DICO_CHECKOUT}[torch,eval]`)."""
    extras = set()
    for line in pip_lines:
        if line.startswith("-e "):
            extras |= {e.strip() for e in re.findall(r"\[(.*)\]", line)[0].split(",")} if "[" in line else set()
    return extras


def pinned_distributions(pip_lines: list[str]) -> set[str]:
    """What an env declares: its `name==version` lines and the requirements of the checkout's extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in checkout_extras(pip_lines):
        reqs += project["optional-dependencies"].get(extra, [])
    names = [line for line in pip_lines if not line.startswith("-")] + reqs
    return {norm(re.split(r"[\s=<>!~;\[]", r, maxsplit=1)[0]) for r in names}


# --- which rule runs which `dico` command in which env ---------------------------------------------

@pytest.fixture(scope="module")
def workflow_rules() -> tuple[str | None, dict]:
    """Every rule of the demo and the paper config (a rule defined under an `if` exists in one of them)."""
    def load(configs):
        out = subprocess.run([sys.executable, "-c", RULES_SCRIPT, *configs], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(load, ([], ["config/paper.yaml"])))
    rules = {name: rule for one in loaded for name, rule in one["rules"].items()}
    return loaded[0]["checkout"], rules


def dico_commands() -> dict[str, set[tuple[str, str]]]:
    """`dico` sub-command -> (module, function) of its handler, from dico's own parser; a family with
    sub-commands of its own (`dico report table-main`): all of theirs."""
    from dico.cli import build_parser

    def subcommands(parser):
        return next((a.choices for a in parser._actions if isinstance(a.choices, dict)), {})

    out = {}
    for name, sub in subcommands(build_parser()).items():
        fns = [sub.get_default("fn")] if sub.get_default("fn") else [p.get_default("fn") for p in subcommands(sub).values()]
        out[name] = {(fn.__module__, fn.__name__) for fn in fns}
    return out


def commands_of(rule: dict, known: dict[str, str]) -> set[str]:
    """The `dico` sub-commands a rule's shell command runs: `dico <cmd>` in the command or in a param
    it inserts (the GPU wrapper `dico gpu-run`), and `{params.<launcher>} <cmd>` where the param's text
    names dico (dico.launch: plain `dico` or `torchrun ... -m dico`)."""
    shell, found = rule["shell"] or "", set()
    word = r"\s+([a-z][a-z0-9-]*)(?![\w.])"
    for name, text in rule["params"].items():
        if "{params." + name in shell:  # a param's text may hold other words (run names): known commands only
            after = re.findall(r"\{params\." + name + r"\}" + word, shell) if re.search(r"\bdico\b", text) else []
            found |= {w for w in after + re.findall(r"(?<![\w.-])dico" + word, text) if w in known}
    found |= set(re.findall(r"(?<![\w.-])dico" + word, shell))
    unknown = found - set(known)
    assert not unknown, f"runs `dico {sorted(unknown)[0]}`, which is no dico command ({sorted(known)})"
    return found


# --- what a `dico` command imports ---------------------------------------------------------------

def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _optional(node: ast.Try) -> bool:
    """A `try:` whose `except` catches ImportError (or anything): what it imports is optional."""
    names = {n.id for h in node.handlers if h.type for n in ast.walk(h.type) if isinstance(n, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception"}) or any(not h.type for h in node.handlers)


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str, str | None]]:
    """(local name, module, name in it or None) of each name an import statement binds, absolute."""
    if isinstance(node, ast.Import):
        return [(a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0], None)
                for a in node.names]
    if node.module == "__future__":
        return []
    package = module if module_file(module).name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
    source = ".".join(base + ([node.module] if node.module else []))
    return [(a.asname or a.name, f"{source}.{a.name}", None) if module_file(f"{source}.{a.name}")
            else (a.asname or a.name, source, a.name) for a in node.names]


@functools.lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    return ast.parse(module_file(module).read_text())


@functools.lru_cache(maxsize=None)
def module_info(module: str) -> tuple[dict, dict]:
    """(the module-level names an import binds -> (module, name or None), the module-level functions and
    classes by name) of a dico module."""
    tree, aliases = _tree(module), {}
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in _executed(tree, functions=False):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            aliases.update({local: (mod, name) for local, mod, name in _imported(module, node)})
    return aliases, defs


def _executed(node: ast.AST, functions: bool):
    """The nodes under `node` that run: not `if TYPE_CHECKING:` nor an optional import's `try` body, and,
    unless `functions`, not the bodies of functions (their decorators and defaults do run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        if isinstance(child, ast.Try) and _optional(child):
            for sub in child.orelse + child.finalbody:
                yield sub
                yield from _executed(sub, functions)
            continue
        if not functions and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for sub in child.decorator_list + [d for d in ast.walk(child.args) if isinstance(d, ast.expr)]:
                yield sub
                yield from _executed(sub, functions)
            continue
        yield child
        yield from _executed(child, functions)


def uses(module: str, name: str | None) -> tuple[set[tuple[str, str | None]], set[str]]:
    """What running `name` of a dico module (None: its module-level code; `!name`: the imports inside
    it alone) needs: the (module, name) items of dico it reaches (functions and classes it names, modules
    it imports) and the third-party modules."""
    aliases, defs = module_info(module)
    only_imports = bool(name) and name.startswith("!")  # `!f`: the imports inside f alone
    name = name.lstrip("!") if name else name
    root = defs.get(name) if name else _tree(module)
    if root is None:  # a constant, or a name the module imports and passes on
        return ({aliases[name]} if name in aliases else set()), set()
    items, outside = {(module, None)}, set()
    for node in [root] + list(_executed(root, functions=name is not None)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for _, mod, attr in _imported(module, node):
                if mod.split(".")[0] == "dico":
                    items |= {(mod, None)} | ({(mod, attr)} if attr and name else set())
                elif mod.split(".")[0] not in sys.stdlib_module_names:
                    outside.add(mod.split(".")[0])
        elif only_imports:
            continue
        elif isinstance(node, ast.Name) and name:
            items |= {(module, node.id)} if node.id in defs else ({aliases[node.id]} if node.id in aliases else set())
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            mod, attr = aliases[node.value.id]
            items |= {(mod, node.attr)} if attr is None and mod.startswith("dico") else set()
    return items, outside


@functools.lru_cache(maxsize=None)
def step_imports(entries: frozenset[tuple[str, str | None]]) -> dict[str, str]:
    """Third-party top-level module -> the dico module that imports it, for everything reachable from
    `entries`: each (module, function) item brings its body's imports and the functions it names."""
    out, seen, todo = {}, set(), sorted(entries, key=str)
    while todo:
        item = todo.pop()
        if item in seen or not item[0].startswith("dico") or not module_file(item[0]):
            continue
        seen.add(item)
        parts = item[0].split(".")
        todo += [(".".join(parts[:i]), None) for i in range(1, len(parts))]  # parent packages' __init__
        items, outside = uses(*item)
        todo += sorted(items - seen, key=str)
        for name in sorted(outside):
            out.setdefault(name, item[0])
    return out


def command_entries(commands: set[str], known: dict[str, set[tuple[str, str]]]) -> set[tuple[str, str | None]]:
    """What runs for `dico <commands>`: dico.cli's module-level code, the imports inside its main() and
    build_parser() and inside every family's register() (the parser is built whole; their bodies name
    every handler, but call none), and each command's handler."""
    families = {mod for hs in known.values() for mod, _ in hs}
    return ({("dico.cli", None), ("dico.cli", "!main"), ("dico.cli", "!build_parser")}
            | {(f, "!register") for f in families} | {h for c in commands for h in known[c]})


def test_every_rule_s_env_pins_what_its_commands_import(workflow_rules):
    """A rule's env pins a distribution for every third-party module its `dico` commands can import
    (import name -> distribution by the installed packages' own records: PIL -> pillow, yaml -> PyYAML)."""
    _, rules = workflow_rules
    known = dico_commands()
    providers = importlib.metadata.packages_distributions()
    problems = []
    with_env = {name: r for name, r in rules.items() if r["env"]}
    assert {"train_xe", "evaluate", "table_main", "cache_features", "make_demo_data"} <= set(with_env)
    for name, rule in sorted(with_env.items()):
        env = Path(rule["env"])
        assert env.is_file(), f"rule {name}: its conda env {env} does not exist"
        commands = commands_of(rule, known)
        assert commands, f"rule {name} runs no `dico` command: {rule['shell']!r}"
        pinned = pinned_distributions(env_spec(env)[1])
        for module, importer in sorted(step_imports(frozenset(command_entries(commands, known))).items()):
            dists = {norm(d) for d in providers.get(module, [])}
            if not dists:
                problems.append(f"rule {name} (`dico {' '.join(sorted(commands))}`): {importer} imports {module!r}, "
                                f"which no installed distribution provides: add its distribution to pyproject.toml "
                                f"and envs/{env.name}")
            elif not dists & pinned:
                problems.append(f"envs/{env.name}, rule {name} (`dico {' '.join(sorted(commands))}`): {importer} "
                                f"imports {module!r}, but the env pins none of {sorted(dists)}: add "
                                f"`{sorted(dists)[0]}==<version>` to its pip section (the version pyproject.toml pins)")
    assert not problems, "\n".join(problems)


# --- the resolution ------------------------------------------------------------------------------

def _pypi_reason() -> str | None:
    try:
        urllib.request.urlopen(PYPI + "pip/", timeout=20).close()
    except OSError as e:
        return f"PyPI ({PYPI}) cannot be reached from here ({e}): the envs' pip sections are not resolved"
    # the version from the metadata, not `import pip`: importing pip switches setuptools' distutils shim
    # off for the whole process (pytest's worker), and a later torch.compile then fails on the stdlib one
    pip_version = importlib.metadata.version("pip")
    version = tuple(int(p) for p in pip_version.split(".")[:2])
    if version < PIP_MIN:
        return (f"pip {pip_version} downloads every wheel in a dry run (GBs for torch): "
                f"install the test extra (pip>={'.'.join(map(str, PIP_MIN))}): pip install -e '.[test]'")
    return None


def resolve(env: Path, checkout: str, prefix: Path) -> dict:
    """pip's dry run of an env's pip section, set up as conda does it under Snakemake: the section in a
    requirements file beside the env file's copy under the conda prefix, pip started in that folder, the
    Snakefile's DICO_CHECKOUT in the environment. Returns pip's installation report (or its error)."""
    python, pip_lines = env_spec(env)
    prefix.mkdir(parents=True)
    (prefix / "env.yaml").write_text(env.read_text())
    (prefix / "condaenv.requirements.txt").write_text("\n".join(pip_lines) + "\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    clean.update(PIP_CONFIG_FILE=os.devnull, DICO_CHECKOUT=checkout)
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", "report.json",
           "--use-feature=fast-deps", "--python-version", python, "--only-binary=:all:",
           "--target", str(prefix / "target"), "--index-url", PYPI, "--timeout", "60",
           "-r", "condaenv.requirements.txt"]
    out = subprocess.run(cmd, cwd=prefix, env=clean, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": "\n".join(line for line in (out.stdout + out.stderr).splitlines()
                                   if "fast-deps" not in line)[-4000:]}
    return json.loads((prefix / "report.json").read_text())


@pytest.fixture(scope="module")
def resolutions(workflow_rules, tmp_path_factory) -> dict[str, dict]:
    reason = _pypi_reason()
    if reason:
        pytest.skip(reason)
    checkout, _ = workflow_rules
    assert checkout and Path(checkout).resolve() == ROOT, (
        f"the Snakefile exports DICO_CHECKOUT={checkout!r}: the envs install the checkout from there "
        f"(`-e ${{DICO_CHECKOUT}}[...]`), so it must be this checkout ({ROOT})")
    base = tmp_path_factory.mktemp("conda")
    with ThreadPoolExecutor(len(ENVS)) as pool:  # network-bound: all envs at once
        reports = pool.map(lambda e: resolve(e, checkout, base / e.stem), ENVS)
    return dict(zip((e.stem for e in ENVS), reports))


@pytest.mark.parametrize("env", [e.stem for e in ENVS])
def test_env_pip_section_resolves(env, resolutions):
    """pip finds one consistent set of wheels for the env's Python, with every pin at its version and
    this checkout (with the extras the env names) among them."""
    python, pip_lines = env_spec(ROOT / "envs" / f"{env}.yaml")
    report = resolutions[env]
    assert "error" not in report, (f"envs/{env}.yaml: pip cannot resolve the pip section for Python {python}:\n"
                                   f"{report.get('error')}")
    got = {norm(i["metadata"]["name"]): i for i in report["install"]}
    for line in pip_lines:
        if line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        assert got[norm(name)]["metadata"]["version"] == version, f"envs/{env}.yaml: {line} resolved otherwise"
    project = got.get("dico-repro")
    assert project and project["download_info"]["url"] == ROOT.as_uri(), (
        f"envs/{env}.yaml: the pip section does not install this checkout ({ROOT}): "
        f"{project and project['download_info']['url']}")
    assert project["download_info"].get("dir_info", {}).get("editable"), f"envs/{env}.yaml: install it with -e"
    missing = checkout_extras(pip_lines) - set(project["metadata"].get("provides_extra", []))
    assert not missing, f"envs/{env}.yaml: the checkout has no extra {sorted(missing)} (pyproject.toml)"
    assert python.rsplit(".", 1)[0] == f"{sys.version_info.major}.{sys.version_info.minor}", (
        f"envs/{env}.yaml pins Python {python}, this interpreter is {sys.version.split()[0]}: pip evaluates "
        f"dependency markers on the interpreter it runs on, so resolve with the env's Python minor version")
