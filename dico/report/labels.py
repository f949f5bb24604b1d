"""How runs and ablation values are named in tables and figures (LaTeX, or matplotlib's mathtext)."""
from __future__ import annotations

import re

from .inputs import base_run, row_key

REWARD_LABELS = {"cider": "CIDEr", "clip_s": "CLIP-S", "pac_s": "PAC-S"}
# Math mode, so the same label works in LaTeX and in matplotlib's mathtext.
ABLATION_SYMBOLS = {"beta": r"$\beta$", "tau": r"$\tau$", "k": r"$k$", "reward": "reward"}


def latex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(c, c) for c in str(text))


def reward_label(reward: str) -> str:
    return REWARD_LABELS.get(reward, reward)


def run_label(run: str, latex: bool = True) -> str:
    """XE, SCST (CIDEr), DiCO, DiCO ($\\beta$=0.05): valid LaTeX (latex=True) or mathtext."""
    run = base_run(run)
    esc = latex_escape if latex else str
    if run == "xe":
        return "XE"
    if run == "dico":
        return "DiCO"
    if run.startswith("scst_"):
        return f"SCST ({esc(reward_label(run[5:]))})"
    m = re.fullmatch(r"dico_([a-z]+)-(.+)", run)
    if m:
        name, value = m.groups()
        value = reward_label(value) if name == "reward" else value
        return f"DiCO ({ABLATION_SYMBOLS.get(name, esc(name))}={esc(value)})"
    return esc(run)


def run_order(runs, scst_rewards=()) -> list[str]:
    """The paper's row order: XE, SCST per reward, DiCO, then anything else in input order."""
    canon = ["xe"] + [f"scst_{r}" for r in scst_rewards] + ["dico"]
    runs = list(dict.fromkeys(runs))
    return [r for r in canon if r in runs] + [r for r in runs if r not in canon]


def ablation_values(name: str, spec: dict) -> list[str]:
    """Configured values of one ablation: numbers sorted numerically, others in config order."""
    values = list(spec["ablations"][name])
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def default_value(name: str, spec: dict) -> str | None:
    return row_key(spec["dico"][name]) if name in spec.get("dico", {}) else None
