"""The chart README's values table, generated from the `# --` comments of values.yaml (helm-docs format).

helm-docs itself is a Go binary that no registry here ships, so this reads the same convention: a key
documented by `# -- text` (continued by following `#` lines) becomes a row Key | Type | Default |
Description. `python -m tests.helm.values_doc` rewrites the table in helm/recserve/README.md;
tests/helm/test_chart.py fails while the README's table differs from a fresh one.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "recserve"
START = "<!-- values-table:start -->"
END = "<!-- values-table:end -->"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-]+):(\s|$)")


@dataclass(frozen=True)
class ValueDoc:
    """One documented key: its dotted path, the parsed default and the `# --` description."""

    path: str
    default: Any
    description: str


def documented_values(text: str) -> list[ValueDoc]:
    """Every key of a values.yaml text preceded by a `# --` comment, in file order."""
    data = yaml.safe_load(text)
    docs: list[ValueDoc] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment is not None:
            comment.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not match:
            if stripped and not stripped.startswith("#"):
                comment = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        keys = [k for _, k in stack]
        found, value = _lookup(data, keys)
        if found and comment is not None:
            docs.append(ValueDoc(".".join(keys), value, " ".join(comment)))
        comment = None
    return docs


def _lookup(data: Any, keys: list[str]) -> tuple[bool, Any]:
    # Keys inside list items (workerGroups[0].name) do not resolve: they belong to the list's row.
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return False, None
        data = data[key]
    return True, data


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def values_table(text: str) -> str:
    """The Markdown table of a values.yaml text."""
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for doc in documented_values(text):
        default = json.dumps(doc.default, separators=(",", ":"), sort_keys=False)
        rows.append(
            f"| {doc.path} | {_type(doc.default)} | `{_cell(default)}` | {_cell(doc.description)} |"
        )
    return "\n".join(rows) + "\n"


def readme_with_table(readme: str, table: str) -> str:
    """The README text with the part between the markers replaced by the table."""
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main() -> int:
    readme = CHART / "README.md"
    table = values_table((CHART / "values.yaml").read_text())
    readme.write_text(readme_with_table(readme.read_text(), table))
    print(f"wrote the values table into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
