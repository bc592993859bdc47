"""Offline A/B replay: two registered bundle versions served in-process to simulated users of a
generated data set, clicked by the generator's planted position-biased click model.

What is simulated is what is served: both versions are fetched, verified and loaded through
`serve_app.models.ModelSource` and answer through `serve_app.recommend.recommend_in_process` with the
serving ranking knobs. Each user's state is the `user_profile` row training writes for Feast (the end
of the log), assembled by the online reader's `assemble_user_features`; the parity test checks that
the online read returns exactly that. This is the one training module allowed to import serving
internals (`serve_app.recommend/models/config/features`); serving never imports it.

Design: per run (own seed) a sample of users sees both variants' top-k lists (paired) and clicks are
drawn with common random numbers, one uniform per (user, position) shared by both variants, so an
identical list yields identical clicks and the noise of the difference shrinks. Lift per run is
CTR_challenger / CTR_champion - 1. Intervals: a t-interval over the per-run lifts, and a paired
bootstrap over (run, user) units of the pooled lift, which respects the pairing (the pooled
two-proportion interval would assume independent arms and overstate the noise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy import stats
from tqdm import tqdm

from training.config import TrainingSettings
from training.data import Dataset, read_dataset, snapshot_id
from training.features import encode_log, user_states_at
from training.synthetic import click_probability, generate

if TYPE_CHECKING:
    from serve_app.config import RankingConfig
    from serve_app.models import ModelSource
    from serve_app.recommend import ServingModel

CHUNK = 64  # users per in-process pipeline call (the UserTower batches the same way)
DEFAULT_BOOTSTRAP = 2_000


class SimulationError(RuntimeError):
    """The simulation cannot be set up (no planted truth, bundles from other data, bad ids)."""


# --- statistics (pure) ---------------------------------------------------------------------------


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean; bounds NaN for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * float(x.std(ddof=1))
    half /= math.sqrt(len(x))
    return mean, mean - half, mean + half


def ratio_lift(clicks_a: float, imps_a: float, clicks_b: float, imps_b: float) -> float:
    """CTR_b / CTR_a - 1 (NaN when CTR_a is 0 or undefined)."""
    if imps_a <= 0 or imps_b <= 0 or clicks_a <= 0:
        return math.nan
    return (clicks_b / imps_b) / (clicks_a / imps_a) - 1.0


def paired_bootstrap_lift(
    clicks_a: np.ndarray,
    imps_a: np.ndarray,
    clicks_b: np.ndarray,
    imps_b: np.ndarray,
    *,
    resamples: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the pooled lift, resampling units (users) with both arms together."""
    n = len(clicks_a)
    if n == 0 or resamples <= 0:
        return math.nan, math.nan
    arrays = np.stack([clicks_a, imps_a, clicks_b, imps_b]).astype(np.float64)  # [4, n]
    rng = np.random.default_rng(seed)
    lifts = np.empty(resamples, dtype=np.float64)
    step = max(1, 2_000_000 // n)  # bounds the [step, n] index matrix
    for start in range(0, resamples, step):
        size = min(step, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        ca, ia, cb, ib = (a[idx].sum(axis=1) for a in arrays)
        with np.errstate(divide="ignore", invalid="ignore"):
            lifts[start : start + size] = (cb / ib) / (ca / ia) - 1.0
    alpha = (1.0 - confidence) / 2
    finite = lifts[np.isfinite(lifts)]
    if len(finite) == 0:
        return math.nan, math.nan
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(low), float(high)


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantStats:
    """One variant's traffic: shown items, simulated clicks, and the noise-free expected CTR."""

    version: str
    impressions: int
    clicks: int
    expected_clicks: float  # sum of the true click probabilities of everything shown

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else math.nan

    @property
    def expected_ctr(self) -> float:
        return self.expected_clicks / self.impressions if self.impressions else math.nan


@dataclass(frozen=True)
class RunResult:
    run: int
    users: int
    champion: VariantStats
    challenger: VariantStats

    @property
    def lift(self) -> float:
        a, b = self.champion, self.challenger
        return ratio_lift(a.clicks, a.impressions, b.clicks, b.impressions)

    @property
    def expected_lift(self) -> float:
        a, b = self.champion, self.challenger
        return ratio_lift(a.expected_clicks, a.impressions, b.expected_clicks, b.impressions)


@dataclass(frozen=True)
class SimulationReport:
    """Challenger vs champion over `runs`: mean lift with its t-interval over runs, the paired
    bootstrap interval of the pooled lift, and the same for the noise-free expected CTR."""

    dataset: str
    k: int
    seed: int
    confidence: float
    runs: tuple[RunResult, ...]
    champion: VariantStats  # pooled over runs
    challenger: VariantStats
    lift: float  # mean of the per-run lifts
    ci_low: float  # t-interval over runs
    ci_high: float
    bootstrap_low: float  # paired bootstrap over (run, user) of the pooled lift
    bootstrap_high: float
    expected_lift: float
    expected_ci_low: float
    expected_ci_high: float

    @property
    def champion_ctr(self) -> float:
        return self.champion.ctr

    @property
    def challenger_ctr(self) -> float:
        return self.challenger.ctr

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (NaN as None), derived CTRs and lifts included."""

        def variant(v: VariantStats) -> dict[str, Any]:
            return {**asdict(v), "ctr": v.ctr, "expected_ctr": v.expected_ctr}

        out = {
            **{
                k: v for k, v in asdict(self).items() if k not in ("runs", "champion", "challenger")
            },
            "champion": variant(self.champion),
            "challenger": variant(self.challenger),
            "runs": [
                {
                    "run": r.run,
                    "users": r.users,
                    "champion": variant(r.champion),
                    "challenger": variant(r.challenger),
                    "lift": r.lift,
                    "expected_lift": r.expected_lift,
                }
                for r in self.runs
            ],
        }
        return _finite(out)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report_json(report: SimulationReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return path


# --- set-up: versions, truth, user features ------------------------------------------------------


def load_variant(source: ModelSource, ref: str) -> ServingModel:
    """The version `ref` (alias or version number) names, fetched, verified and loaded as served."""
    return source.load(source.resolve(ref))


def generated_dataset(
    models: Sequence[ServingModel], settings: TrainingSettings, dataset_dir: Path | None = None
) -> Dataset:
    """The generated data set the bundles were trained on, with its planted truth.

    Manifests record the data set name and a content hash (`data_snapshot_id`), not the generator
    config: read the copy training wrote (`dataset_dir`, else data_dir/datasets/<name>), else
    regenerate from `settings.synthetic`; either way the content hash must match.
    """
    names = {str(m.bundle.manifest.params.get("dataset", "")) for m in models}
    snapshots = {m.bundle.manifest.data_snapshot_id for m in models}
    if len(snapshots) != 1 or len(names) != 1:
        raise SimulationError(f"the versions were trained on different data: {sorted(names)}")
    name, snapshot = names.pop(), snapshots.pop()
    directory = dataset_dir or settings.data_dir / "datasets" / name
    if (directory / "events.parquet").exists():
        dataset = read_dataset(directory, name=name)
        where = str(directory)
    else:
        dataset = generate(settings.synthetic, progress=False)
        where = f"regenerated from {settings.synthetic!r}"
    if not dataset.truth:
        raise SimulationError(f"{where} has no planted truth: only generated data can be simulated")
    if snapshot_id(dataset) != snapshot:
        raise SimulationError(
            f"data set {where} is not the one {name} was trained on (snapshot {snapshot}); "
            "pass --dataset-dir or the --size/--config used for training"
        )
    return dataset


def _generator_rows(ids: np.ndarray, prefix: str, n: int, what: str) -> np.ndarray:
    """Truth rows of generator ids (`u17` -> 17); SimulationError for an id it did not write."""
    text = pd.Series(np.asarray(ids, dtype=str))
    digits = text.str.removeprefix(prefix)
    ok = text.str.startswith(prefix) & digits.str.fullmatch(r"\d+").fillna(False).astype(bool)
    if not ok.all():
        raise SimulationError(f"{what} id {text[~ok].iloc[0]!r} is not a generator id")
    rows = digits.astype(np.int64).to_numpy()
    if (rows >= n).any():
        raise SimulationError(f"{what} id {text[rows >= n].iloc[0]!r} has no planted vector")
    return rows


@dataclass(frozen=True)
class _Arm:
    """One variant ready to serve the population: its model and every user's profile row."""

    model: ServingModel
    profiles: pd.DataFrame  # user_profile rows, in population order
    item_truth_rows: dict[str, int]


def _arm(model: ServingModel, dataset: Dataset, population: np.ndarray) -> _Arm:
    from training.feature_tables import user_profile_frame  # imports Feast (seconds)

    bundle = model.bundle
    catalog_ids = dataset.catalog["item_id"].to_numpy(dtype=str)
    if set(bundle.item_ids.astype(str)) != set(catalog_ids):
        raise SimulationError(f"version {model.version}: item ids differ from the data set's")
    truth_rows = _generator_rows(
        bundle.item_ids, "i", len(dataset.truth["item_vectors"]), "item"
    ).tolist()
    log = encode_log(
        dataset.events,
        pd.Index(bundle.item_ids),
        bundle.item_categories,
        len(bundle.manifest.categories),
    )
    states = user_states_at(log, population, None, model.history_length)
    profiles = user_profile_frame(states, bundle.item_ids, pd.Timestamp.now(tz="UTC"))
    return _Arm(model, profiles, dict(zip(bundle.item_ids.astype(str), truth_rows, strict=True)))


# --- the simulation ------------------------------------------------------------------------------


def _serve(
    arm: _Arm, user_ids: list[str], rows: np.ndarray, ranking: RankingConfig, k: int
) -> list[list[str]]:
    """Top-k item ids per user, through the serving pipeline in-process."""
    from serve_app.deployments.user_tower import feature_shapes
    from serve_app.features import assemble_user_features
    from serve_app.recommend import recommend_in_process
    from serve_app.stages.records import Query

    model = arm.model
    part = arm.profiles.iloc[rows]
    batch = {c: part[c].tolist() for c in ("event_count", "category_prefs", "base_embedding")}
    batch["recent_items"] = part["recent_items"].tolist()
    features = assemble_user_features(
        user_ids, batch, None, feature_shapes(model.tower), model.version, degraded=False
    )
    seen = [tuple(s) for s in part["seen_items"]]
    queries = [
        Query(request_id=f"sim-{u}", user_id=u, k=k, model_version=model.version, variant="sim")
        for u in user_ids
    ]
    results = recommend_in_process(model, queries, features, seen, ranking)
    return [[item.item_id for item in r.items] for r in results]


def _traffic(
    arm: _Arm,
    population: np.ndarray,
    rows: np.ndarray,
    user_truth: np.ndarray,
    uniforms: np.ndarray,
    truth: dict[str, np.ndarray],
    ranking: RankingConfig,
    progress: tqdm[Any],
) -> np.ndarray:
    """[3, n]: clicks, impressions and expected clicks of each sampled user's top-k list."""
    n, k = uniforms.shape
    out = np.zeros((3, n), dtype=np.float64)
    for start in range(0, n, CHUNK):
        chunk = rows[start : start + CHUNK]
        for i, items in enumerate(
            _serve(arm, population[chunk].tolist(), chunk, ranking, k), start
        ):
            if items:
                p = click_probability(
                    truth,
                    np.full(len(items), user_truth[rows[i]]),
                    np.array([arm.item_truth_rows[x] for x in items], dtype=np.int64),
                    np.arange(len(items)),
                )
                out[:, i] = (uniforms[i, : len(items)] < p).sum(), len(items), p.sum()
        progress.update(len(chunk))
    return out


def _stats(version: str, traffic: np.ndarray) -> VariantStats:
    return VariantStats(
        version, int(traffic[1].sum()), int(traffic[0].sum()), float(traffic[2].sum())
    )


def simulate(
    champion: ServingModel,
    challenger: ServingModel,
    dataset: Dataset,
    ranking: RankingConfig,
    *,
    runs: int = 5,
    users: int = 1_000,
    k: int = 10,
    seed: int = 0,
    confidence: float = 0.95,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    progress: bool = True,
) -> SimulationReport:
    """Replay `runs` samples of `users` users (from the log's users) against both versions."""
    if runs < 1 or users < 1 or k < 1:
        raise ValueError("runs, users and k must be at least 1")
    truth = dataset.truth
    population = np.sort(dataset.events["user_id"].unique().astype(str))
    user_truth = _generator_rows(population, "u", len(truth["user_vectors"]), "user")
    arms = (_arm(champion, dataset, population), _arm(challenger, dataset, population))
    n = min(users, len(population))
    results: list[RunResult] = []
    traffic: list[list[np.ndarray]] = [[], []]  # per arm, per run: [3, n]
    bar = tqdm(total=runs * 2 * n, desc="simulate", unit="list", disable=not progress)
    for run in range(runs):
        rng = np.random.default_rng([seed, run])
        rows = rng.choice(len(population), size=n, replace=False)
        uniforms = rng.random((n, k))  # common random numbers: one per (user, position)
        for side, arm in enumerate(arms):
            traffic[side].append(
                _traffic(arm, population, rows, user_truth, uniforms, truth, ranking, bar)
            )
        results.append(
            RunResult(
                run,
                n,
                _stats(champion.version, traffic[0][-1]),
                _stats(challenger.version, traffic[1][-1]),
            )
        )
    bar.close()

    a, b = (np.concatenate(t, axis=1) for t in traffic)  # per arm [3, runs * n], (run, user) units
    lift, low, high = t_interval([r.lift for r in results], confidence)
    e_lift, e_low, e_high = t_interval([r.expected_lift for r in results], confidence)
    b_low, b_high = paired_bootstrap_lift(
        a[0], a[1], b[0], b[1], resamples=bootstrap, confidence=confidence, seed=seed
    )
    return SimulationReport(
        dataset=dataset.name,
        k=k,
        seed=seed,
        confidence=confidence,
        runs=tuple(results),
        champion=_stats(champion.version, a),
        challenger=_stats(challenger.version, b),
        lift=lift,
        ci_low=low,
        ci_high=high,
        bootstrap_low=b_low,
        bootstrap_high=b_high,
        expected_lift=e_lift,
        expected_ci_low=e_low,
        expected_ci_high=e_high,
    )


# --- output --------------------------------------------------------------------------------------


def print_report(report: SimulationReport, console: Console) -> None:
    """Per-run table, pooled per-variant table and the lift with both intervals."""
    pct = "{:+.2%}".format
    runs = Table(title=f"Simulated traffic on {report.dataset} (top-{report.k}, paired users)")
    for column in ("run", "users", "CTR champion", "CTR challenger", "lift", "expected lift"):
        runs.add_column(column, justify="right")
    for r in report.runs:
        runs.add_row(
            str(r.run),
            str(r.users),
            f"{r.champion.ctr:.4f}",
            f"{r.challenger.ctr:.4f}",
            pct(r.lift),
            pct(r.expected_lift),
        )
    console.print(runs)
    pooled = Table(title="Pooled over runs")
    for column in ("variant", "version", "impressions", "clicks", "CTR", "expected CTR"):
        pooled.add_column(column, justify="left" if column == "variant" else "right")
    for name, v in (("champion", report.champion), ("challenger", report.challenger)):
        pooled.add_row(
            name,
            v.version,
            f"{v.impressions:,}",
            f"{v.clicks:,}",
            f"{v.ctr:.4f}",
            f"{v.expected_ctr:.4f}",
        )
    console.print(pooled)
    level = f"{report.confidence:.0%}"
    console.print(
        f"lift (challenger vs champion): mean over {len(report.runs)} runs {pct(report.lift)}, "
        f"{level} t-interval [{pct(report.ci_low)}, {pct(report.ci_high)}], "
        f"paired bootstrap [{pct(report.bootstrap_low)}, {pct(report.bootstrap_high)}]"
    )
    console.print(
        f"expected-CTR lift (noise-free): {pct(report.expected_lift)}, "
        f"{level} t-interval [{pct(report.expected_ci_low)}, {pct(report.expected_ci_high)}]"
    )
