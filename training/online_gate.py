"""Online side of the promotion gate: the live A/B counts of two variants, read from Redis.

`online_gate` is pure (refuse only a treatment whose CTR is significantly below the control's);
`read_online_evidence` is the thin Redis read around it; `print_online_evidence` shows the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import redis
from rich.console import Console
from rich.table import Table

from serve_app.experiments import ExperimentLog, VariantCounts
from serve_app.redis_client import connect_redis
from training.config import OnlineGateConfig

# The window only bounds attribution records; reading counts does not depend on it.
_READ_WINDOW_SECONDS = 1.0


@dataclass(frozen=True)
class OnlineEvidence:
    """The online comparison behind a promotion: treatment CTR minus control CTR, 95% CI.

    `applies` is False when either variant has fewer than `min_impressions` (or Redis could not
    be read): the decision then rests on the offline gate alone. `passed` is False only when it
    applies and the difference's upper bound is below zero.
    """

    experiment: str
    control: str
    treatment: str
    min_impressions: int
    applies: bool
    passed: bool
    verdict: str  # "significantly worse" | "significantly better" | "inconclusive" | "none"
    reason: str
    control_counts: VariantCounts | None = None
    treatment_counts: VariantCounts | None = None
    difference: tuple[float, float, float] | None = None  # (diff, low, high) of treatment - control

    @classmethod
    def none(
        cls,
        config: OnlineGateConfig,
        reason: str,
        control: VariantCounts | None = None,
        treatment: VariantCounts | None = None,
    ) -> OnlineEvidence:
        """No online evidence (decide on the offline gate alone), with whatever counts were read."""
        return cls(
            experiment=config.experiment,
            control=config.control,
            treatment=config.treatment,
            min_impressions=config.min_impressions,
            applies=False,
            passed=True,
            verdict="none",
            reason=reason,
            control_counts=control,
            treatment_counts=treatment,
        )


def online_gate(
    control: VariantCounts, treatment: VariantCounts, config: OnlineGateConfig
) -> OnlineEvidence:
    """Gate the treatment on CTR (clicked lists / served lists) against the control.

    Applies only when both variants have >= `min_impressions`; then refuses when the Newcombe 95%
    interval of treatment - control lies entirely below zero, and passes otherwise (better or not
    distinguishable: the offline gate decides those).
    """
    short = [
        f"{name} has {counts.impressions:,}"
        for name, counts in ((config.control, control), (config.treatment, treatment))
        if counts.impressions < config.min_impressions
    ]
    if short:
        return OnlineEvidence.none(
            config,
            f"{' and '.join(short)} impressions, need >= {config.min_impressions:,} per variant",
            control,
            treatment,
        )
    diff, low, high = control.ctr_difference(treatment)
    if high < 0:
        verdict = "significantly worse"
    elif low > 0:
        verdict = "significantly better"
    else:
        verdict = "inconclusive"
    reason = (
        f"{config.treatment} CTR {treatment.ctr:.2%} vs {config.control} {control.ctr:.2%}: "
        f"{_pp(diff)} (95% CI {_pp(low)} to {_pp(high)}), {verdict}"
    )
    return replace(
        OnlineEvidence.none(config, reason, control, treatment),
        applies=True,
        passed=high >= 0,
        verdict=verdict,
        difference=(diff, low, high),
    )


def read_variant_counts(
    client: redis.Redis, config: OnlineGateConfig, variants: Sequence[str]
) -> dict[str, VariantCounts]:
    """The experiment's live counts of `variants` (zeros for a variant never served)."""
    log = ExperimentLog(client, config.key_prefix, config.experiment, _READ_WINDOW_SECONDS)
    return log.counts(variants)


def read_online_evidence(redis_url: str | None, config: OnlineGateConfig) -> OnlineEvidence:
    """Read the two variants' counts from Redis and gate them; no URL or no answer: no evidence."""
    if not redis_url:
        return OnlineEvidence.none(config, "no Redis URL configured (--redis-url / REDIS_URL)")
    client = connect_redis(redis_url, config.redis_timeout_seconds)
    try:
        counts = read_variant_counts(client, config, [config.control, config.treatment])
    except redis.RedisError as exc:
        return OnlineEvidence.none(config, f"Redis unreachable at {redis_url}: {exc}")
    finally:
        client.close()
    return online_gate(counts[config.control], counts[config.treatment], config)


def _pp(value: float) -> str:
    """A CTR difference in percentage points."""
    return f"{value * 100:+.2f} pp"


def online_evidence_table(evidence: OnlineEvidence) -> Table:
    """Both variants' impressions, clicked lists, CTR with its Wilson 95% CI, and the difference."""
    table = Table(
        title=f"Online evidence: experiment '{evidence.experiment}' "
        f"(min {evidence.min_impressions:,} impressions per variant)",
        title_justify="left",
    )
    for column in ("variant", "role", "impressions", "clicked lists", "CTR", "CTR 95% CI"):
        table.add_column(column, justify="left" if column in ("variant", "role") else "right")
    for name, role, counts in (
        (evidence.control, "control", evidence.control_counts),
        (evidence.treatment, "treatment", evidence.treatment_counts),
    ):
        if counts is None:
            table.add_row(name, role, "-", "-", "-", "-")
            continue
        low, high = counts.ctr_interval
        table.add_row(
            name,
            role,
            f"{counts.impressions:,}",
            f"{counts.clicked_requests:,}",
            f"{counts.ctr:.2%}",
            f"{low:.2%} to {high:.2%}",
        )
    if evidence.difference is not None:
        diff, low, high = evidence.difference
        table.add_row("difference", "treat - ctrl", "", "", _pp(diff), f"{_pp(low)} to {_pp(high)}")
    table.caption = (
        f"verdict: {evidence.verdict}; gate {'passed' if evidence.passed else 'refused'}"
    )
    table.caption_justify = "left"
    return table


def print_online_evidence(evidence: OnlineEvidence, console: Console) -> None:
    """The table when the gate applies, else one line saying why there is no online evidence."""
    if evidence.applies:
        console.print(online_evidence_table(evidence))
    else:
        console.print(f"  online evidence: none ({evidence.reason})")
