"""What tables and figures read: metrics files, the paper's reported numbers, the data set's name."""
from __future__ import annotations

from pathlib import Path

from ..config import SEEDED_RUN
from ..io import read_json


def load_metrics(paths) -> list[dict]:
    """Metrics JSONs, each with the path it came from (for provenance)."""
    out = []
    for p in paths:
        m = read_json(p)
        if not isinstance(m, dict) or "metrics" not in m:
            raise ValueError(f"{p}: not a metrics file (no 'metrics' key); produce it with `dico evaluate`")
        m.setdefault("run", Path(p).parent.name)
        out.append({**m, "path": str(p)})
    return out


def base_run(run: str) -> str:
    """`dico_seed2` -> `dico`: seeds of one run are one row (the names dico.config gives them)."""
    m = SEEDED_RUN.match(run)
    return m["base"] if m else run


def group_by_run(metrics: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for m in metrics:
        groups.setdefault(base_run(m["run"]), []).append(m)
    return groups


def load_reported(path) -> dict:
    """{table: {row key: {column: value or None}}} from the reported-numbers YAML (values x100)."""
    import yaml

    if not path:
        return {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    tables = raw.get("tables") or {}
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: 'tables' must map table name -> row -> column -> number")
    # YAML reads `0.05:` as a float and `1:` as an int; rows are keyed like dico.config formats values.
    return {t: {row_key(r): dict(cols or {}) for r, cols in (rows or {}).items()} for t, rows in tables.items()}


def row_key(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def dataset_name(splits_path) -> str | None:
    return read_json(splits_path).get("dataset") if splits_path else None


def best_step(metrics: dict) -> int | None:
    """Training step of the checkpoint these metrics were computed from (None when unknown)."""
    return ((metrics.get("provenance") or {}).get("run_provenance") or {}).get("best_step")
