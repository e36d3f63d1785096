"""Labels as users have them: stray spaces, letter case, a header line repeated inside the file.

A label column read from a user's file is cleaned before classes are counted, so that messy
input never silently becomes extra classes (docs/cli.md, "Data as users have it"):

- surrounding whitespace is stripped (``"positive "`` is ``"positive"``);
- ``data.label_map: {raw: class}`` renames labels explicitly (applied after stripping);
- ``data.normalize_labels: lower`` folds letter case and runs of inner whitespace
  (``"Very  Good"`` → ``"very good"``);
- labels that still differ only by case or inner spacing stop the run, naming every colliding
  value and the rows where it occurs, with the two fixes above;
- rows that repeat the header (``text,label`` again, from files concatenated with their headers)
  stop the run naming the rows, unless ``data.skip_repeated_headers: true`` drops them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import ConfigError

NORMALIZE = ("none", "lower")


def row_name(index: int, path: Path) -> str:
    """How a user finds data row ``index`` (0-based) in the file: ``row 3 (line 4 of the CSV)``."""
    return f"row {index + 1}" + (f" (line {index + 2} of the CSV)" if path.suffix.lower() == ".csv" else "")


def _rows_text(indices: Sequence[int], path: Path, limit: int = 3) -> str:
    shown = ", ".join(str(i + 1) for i in indices[:limit])
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return f"row{'s' if len(indices) > 1 else ''} {shown}{more}"


def folded(label: str) -> str:
    """The label with letter case and inner whitespace runs folded: what a person reads as the same."""
    return " ".join(label.split()).casefold()


def repeated_header_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[int]:
    """Data rows whose values in ``columns`` are the column names themselves (a header repeated)."""
    return [i for i, row in enumerate(rows)
            if all(str(row.get(c) if row.get(c) is not None else "").strip() == c for c in columns)]


def check_options(cfg: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """``data.label_map`` and ``data.normalize_labels``, checked."""
    mapping = cfg.get("label_map") or {}
    if not isinstance(mapping, Mapping) or not all(isinstance(k, (str, int)) and isinstance(v, (str, int))
                                                   for k, v in mapping.items()):
        raise ConfigError(f"data.label_map: expected a mapping of label → class name (e.g. {{Positive: positive}}), "
                          f"got {mapping!r}")
    normalize = cfg.get("normalize_labels", "none") or "none"
    if normalize not in NORMALIZE:
        raise ConfigError(f"data.normalize_labels: expected one of {list(NORMALIZE)}, got {normalize!r}")
    return {str(k).strip(): str(v).strip() for k, v in mapping.items()}, normalize


def clean_labels(values: Sequence[str], cfg: Mapping[str, Any], path: Path, column: str) -> list[str]:
    """``values`` stripped, mapped and (if asked) normalised; raises ``ConfigError`` naming labels
    that still differ only by case or inner spacing, with the rows where each occurs."""
    mapping, normalize = check_options(cfg)
    cleaned = [mapping.get(v.strip(), v.strip()) for v in values]
    if normalize == "lower":
        cleaned = [" ".join(v.split()).lower() for v in cleaned]
    where: dict[str, list[int]] = {}
    for i, value in enumerate(cleaned):
        where.setdefault(value, []).append(i)
    groups: dict[str, list[str]] = {}
    for value in where:
        groups.setdefault(folded(value), []).append(value)
    collisions = [sorted(g) for g in groups.values() if len(g) > 1]
    if collisions:
        lines = [" vs ".join(f"{v!r} ({_rows_text(where[v], path)})" for v in group) for group in collisions[:5]]
        example = collisions[0]
        raise ConfigError(
            f"data.label_column: {path}: {column!r} holds labels that differ only by letter case or spacing, which "
            f"would train as separate classes: " + "; ".join(lines) + ". Say what they mean: data.label_map: "
            f"{{{', '.join(f'{v!r}: {example[0]!r}' for v in example[1:])}}} (explicit), or data.normalize_labels: "
            "lower (fold case and spacing everywhere)")
    return cleaned
