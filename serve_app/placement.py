"""Placement: how the four stages of the online graph are grouped into deployments (no Ray here).

`resolve_placement(value)` turns the `placement` setting (`ServeSettings.placement`,
`RECSERVE_PLACEMENT`, `recserve-serve --placement`, the Helm value `serve.placement`) into groups of
consecutive stages; `serve_app.app` binds one deployment per group, the Router (in the Ingress) calls
them in order with one handle hop per group, and a group hosts its stages as plain function calls
(`serve_app.deployments.group`).

Presets and their deployment names (the Helm chart, serve_config.yaml and the metrics use these):
- `split`: `UserTower` | `Retriever` | `Ranker` | `ReRanker` (four hops; each stage scales alone);
- `two-tier`: `Retrieval` (user_tower + retriever) | `Ranking` (ranker + reranker) (two hops);
- `fused`: the whole chain inside each Ingress replica (no hop, no stage deployment:
  measured faster than one `Pipeline` deployment behind the Ingress on 2 cores,
  bench/graph_vs_inprocess.py).
An explicit list of groups gives any other cut, e.g. `[["user_tower", "retriever", "ranker"],
["reranker"]]`: consecutive stages, each exactly once, in chain order. A group is named by its
stages: one stage keeps its split name (`UserTower`, `Retriever`, `Ranker`, `ReRanker`), the two
two-tier halves keep theirs (`Retrieval`, `Ranking`), the whole chain is `Pipeline` (a deployment
behind the Ingress: `[["user_tower", "retriever", "ranker", "reranker"]]`), and any other group is
the CamelCase join of its stages' names (`UserTowerRetrieverRanker`, `RetrieverRanker`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STAGES = ("user_tower", "retriever", "ranker", "reranker")
FINAL = len(STAGES)  # the chain's position once the final lists are built

# Each stage's deployment name when it is alone (split), the CamelCase part of a custom group's name.
STAGE_DEPLOYMENTS = {
    "user_tower": "UserTower",
    "retriever": "Retriever",
    "ranker": "Ranker",
    "reranker": "ReRanker",
}
NAMED_GROUPS = {
    ("user_tower", "retriever"): "Retrieval",
    ("ranker", "reranker"): "Ranking",
    STAGES: "Pipeline",
}
PRESETS = ("split", "two-tier", "fused")


class PlacementError(ValueError):
    """A `placement` value that names no preset or is not a valid list of groups."""


@dataclass(frozen=True)
class Group:
    """Consecutive stages hosted together: a deployment `name`, or the Ingress replica itself
    (`in_ingress`: no deployment, no hop)."""

    name: str
    stages: tuple[str, ...]
    in_ingress: bool = False

    @property
    def first(self) -> int:
        return STAGES.index(self.stages[0])

    def holds(self, position: int) -> bool:
        """Whether the chain's stage at `position` runs here."""
        return 0 <= position - self.first < len(self.stages)


def group_name(stages: Sequence[str]) -> str:
    """The deployment name of a group of consecutive stages (see the module docstring)."""
    key = tuple(stages)
    if key in NAMED_GROUPS:
        return NAMED_GROUPS[key]
    return "".join(STAGE_DEPLOYMENTS[s] for s in key)


def _groups(groups: Sequence[Sequence[str]]) -> tuple[Group, ...]:
    return tuple(Group(group_name(g), tuple(g)) for g in groups)


def parse_placement(value: str | Sequence[Sequence[str]]) -> str | list[list[str]]:
    """The setting as given: a preset name, or a list of groups (a JSON/YAML list in a string, as an
    environment variable or a flag carries it)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                loaded = json.loads(text)
            except ValueError as exc:
                raise PlacementError(f"placement: not a JSON list of groups ({exc})") from None
            return parse_placement(loaded)
        return text
    if not isinstance(value, list | tuple) or not all(isinstance(g, list | tuple) for g in value):
        raise PlacementError("placement: expected a preset name or a list of lists of stage names")
    return [list(g) for g in value]


def resolve_placement(value: str | Sequence[Sequence[str]]) -> tuple[Group, ...]:
    """The groups `value` names, in chain order. A preset (`split`, `two-tier`, `fused`) or a list
    of groups of consecutive stages covering the chain once, in order; PlacementError otherwise."""
    parsed = parse_placement(value)
    if isinstance(parsed, str):
        if parsed == "split":
            return _groups([[s] for s in STAGES])
        if parsed == "two-tier":
            return _groups([STAGES[:2], STAGES[2:]])
        if parsed == "fused":
            return (Group("Pipeline", STAGES, in_ingress=True),)
        raise PlacementError(
            f"placement: unknown preset {parsed!r} (expected one of {', '.join(PRESETS)}, "
            f"or a list of groups of consecutive stages such as "
            f'[["user_tower", "retriever"], ["ranker", "reranker"]])'
        )
    flat = [s for g in parsed for s in g]
    unknown = sorted({str(s) for s in flat} - set(STAGES))
    if unknown:
        raise PlacementError(
            f"placement: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})"
        )
    if any(not g for g in parsed):
        raise PlacementError("placement: a group must hold at least one stage")
    if sorted(flat) != sorted(STAGES):
        missing = [s for s in STAGES if s not in flat]
        repeated = sorted({s for s in flat if flat.count(s) > 1})
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"repeated {', '.join(repeated)}"] if repeated else []
        )
        raise PlacementError(f"placement: every stage exactly once ({'; '.join(parts)})")
    if tuple(flat) != STAGES:
        raise PlacementError(
            f"placement: groups must hold consecutive stages in chain order "
            f"({' -> '.join(STAGES)}), got {parsed}"
        )
    return _groups(parsed)


def deployment_names(value: str | Sequence[Sequence[str]]) -> list[str]:
    """The stage deployments the placement yields (none for `fused`: it runs in the Ingress)."""
    return [g.name for g in resolve_placement(value) if not g.in_ingress]


def describe_placement(value: str | Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """One entry per group: where it runs and which stages it holds (`recserve-serve config`)."""
    return [
        {
            "deployment": "Ingress" if g.in_ingress else g.name,
            "stages": list(g.stages),
        }
        for g in resolve_placement(value)
    ]
