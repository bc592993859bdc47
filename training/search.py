"""The settings search of `recserve train`: Optuna over the served system on the validation round.

Each trial fits a bundle on the validation round's history (`training.system.fit_system`), writes it,
and scores it through the serving functions on a fixed sample of validation users, in parts: after
each part it reports NDCG@10 so far, and a median pruner stops trials that trail. The first trial is
the settings as given, so the search can only keep or beat them on validation; the second the same
without collaborative models; then Optuna's TPE sampler. A setting pinned by
config, environment or flag (set explicitly: `model_fields_set`) is not searched. Time-boxed by
`search.budget_seconds` (no trial starts after it; one that would need new towers is skipped when
they cannot fit in what is left, one still scoring when it runs out is pruned), at most
`search.max_trials`; every trial is one nested MLflow run. The enqueued trials (the settings as
given, the same without collaborative models) always run and are scored in full, whatever the
budget: the second reuses the first's towers, so it adds a ranker fit and a scoring.

Scaled to the data: the first trial always runs in full, so its cost is what can overrun the budget.
A validation history of more than `search.max_events` events is replaced, for every trial, by a
seeded sample of its users holding about that many events (each sampled user with all their events
and held-out items, the whole catalog): a trial's cost follows the events it trains on, so the first
trial stays near the cost of that many events (about 2 minutes per million on 2 cores) whatever the
data size, and the search spends the rest of the budget on further trials instead of one long fit.
The summary records how many events and users the trials saw.

Two rounds when the log has orders (`session_id`): beside the time-cutoff round, the within-order
round of the same history (`training.rounds.basket_round`): the same trial bundle answers its users
with the first half of their held-out order in the state (as if it had arrived as events), the rest of
the order relevant. The objective is the mean of the two NDCG@10s, so the search cannot buy one
protocol with the other; the best trial's figure per round is recorded (`search.best_by_round`).

Noise is not a gain: the trials are scored on the same validation users, so the best trial's gain
over the settings as given is tested user by user (`paired_gain`). Unless it exceeds
`search.min_gain_z` standard errors, the given settings are kept (`search.kept_given`): a handful of
trials on ~2,000 users always has a "best" a few thousandths above the rest, which is which users were
sampled, not a better system.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from training.config import TrainingSettings
from training.evaluate import mean_ndcg, ndcg_per_user
from training.rounds import BasketRound, Round
from training.system import FitCache, ItemTable, Log, Served, fit_system, write_bundle

log = logging.getLogger(__name__)

# Searched settings (section.field) and how a trial draws each.
Suggest = Callable[[optuna.Trial, str], Any]


def _bool(trial: optuna.Trial, name: str) -> Any:
    return trial.suggest_categorical(name, [True, False])


def _choice(*values: str) -> Suggest:
    return lambda trial, name: trial.suggest_categorical(name, list(values))


def _int(low: int, high: int, step: int = 1, log_: bool = False) -> Suggest:
    return lambda trial, name: trial.suggest_int(name, low, high, step=step, log=log_)


def _float_log(low: float, high: float) -> Suggest:
    return lambda trial, name: trial.suggest_float(name, low, high, log=True)


SPACE: dict[str, Suggest] = {
    "collaborative.ease": _bool,
    "collaborative.transitions": _bool,
    "collaborative.knn": _bool,
    "collaborative.basket": _bool,
    "split.ranker_labels": _choice("window", "tail"),
    "collaborative.ease_lambda": _float_log(20.0, 3000.0),
    "collaborative.knn_neighbors": _int(10, 400, log_=True),
    "ranker.max_depth": _int(2, 8),
    "ranker.max_rounds": _int(50, 800, log_=True),
    "ranker.candidates": _int(50, 300, step=25),
    "collaborative.per_source": _int(10, 100, step=10),
    "cold_start.min_events": _int(0, 10),
}
CF_ONLY = tuple(name for name in SPACE if name.startswith("collaborative."))


def setting(settings: TrainingSettings, name: str) -> Any:
    section, key = name.split(".")
    return getattr(getattr(settings, section), key)


def pinned_settings(settings: TrainingSettings) -> list[str]:
    """Searchable settings that were set explicitly (config file, RECSERVE_*, flag or argument)."""
    pinned = [
        name
        for name in SPACE
        if name.split(".")[1] in getattr(settings, name.split(".")[0]).model_fields_set
    ]
    if "enabled" in settings.collaborative.model_fields_set:
        # Pinned off: nothing collaborative to search; pinned on: at least the models are fit.
        pinned += [n for n in CF_ONLY if n not in pinned and not settings.collaborative.enabled]
    return pinned


def with_values(settings: TrainingSettings, values: dict[str, Any]) -> TrainingSettings:
    """A copy of `settings` with `values` ({"section.field": value}) applied and validated."""
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, key = name.split(".")
        by_section.setdefault(section, {})[key] = value
    update = {
        section: type(getattr(settings, section)).model_validate(
            {**getattr(settings, section).model_dump(), **fields}
        )
        for section, fields in by_section.items()
    }
    return settings.model_copy(update=update)


@dataclass
class SearchResult:
    """The chosen settings and how they were chosen."""

    settings: TrainingSettings
    chosen: dict[str, Any]
    searched: list[str]
    pinned: list[str]
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_ndcg10: float = math.nan  # the objective: the mean of the rounds' NDCG@10
    given_ndcg10: float = math.nan  # trial 0: the settings as given
    best_by_round: dict[str, float] = field(default_factory=dict)  # the chosen trial's, per round
    best_trial: int | None = None  # the trial with the highest objective
    gain: float = math.nan  # its objective minus the given settings', on the same users
    gain_se: float = math.nan  # the standard error of that paired difference
    kept_given: bool = False  # the gain was within `min_gain_z` standard errors: trial 0 chosen
    users: int = 0
    seconds: float = 0.0
    events: int = 0  # validation history events the trials were fit on (a sample above max_events)

    def summary(self) -> dict[str, Any]:
        """What the manifest records (params `search.*`)."""
        states = [t["state"] for t in self.trials]
        return {
            "search.searched": self.searched,
            "search.pinned": self.pinned,
            "search.chosen": self.chosen,
            "search.trials": len(self.trials),
            "search.pruned": states.count("PRUNED"),
            "search.failed": states.count("FAIL"),
            "search.validation_users": self.users,
            "search.best_by_round": self.best_by_round,
            "search.best_trial": self.best_trial,
            "search.gain_over_given": _rounded(self.gain),
            "search.gain_se": _rounded(self.gain_se),
            "search.kept_given": self.kept_given,
            "search.events": self.events,
            "search.seconds": round(self.seconds, 1),
        }


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def paired_gain(
    given: dict[str, np.ndarray], other: dict[str, np.ndarray], users: dict[str, np.ndarray]
) -> tuple[float, float]:
    """(gain, standard error) of `other` over `given` on the search's objective, the mean over
    rounds of each round's mean per-user NDCG@10. `given[r]` and `other[r]` are per-user NDCG on the
    same users `users[r]` (NaN: nothing relevant, not counted). The user is the unit: the objective's
    difference is a sum of one term per user (a user in both rounds adds both rounds' shares), and
    its variance is estimated from those terms, so a user's two rounds are not taken as independent."""
    rounds = [r for r in given if np.any(~np.isnan(given[r]))]
    if not rounds:
        return math.nan, math.nan
    ids: list[np.ndarray] = []
    terms: list[np.ndarray] = []
    for r in rounds:
        difference = other[r] - given[r]
        scored = ~np.isnan(difference)
        ids.append(np.asarray(users[r])[scored])
        terms.append(difference[scored] / (len(rounds) * np.count_nonzero(scored)))
    codes, uniques = pd.factorize(np.concatenate(ids))
    per_user = np.bincount(codes, weights=np.concatenate(terms), minlength=len(uniques))
    if len(per_user) < 2:
        return float(per_user.sum()), math.inf
    return float(per_user.sum()), float(math.sqrt(len(per_user) * per_user.var(ddof=1)))


def sample_users(user_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(user_ids) <= n:
        return user_ids
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(user_ids, size=n, replace=False))


def subsample_round(validation: Round, max_events: int, seed: int) -> Round:
    """`validation` itself when its history holds at most `max_events` events, else a seeded sample
    of its users (all their history events and held-out items) holding about that many."""
    n = len(validation.history)
    if n <= max_events:
        return validation
    owners = validation.history["user_id"].astype(str)
    everyone = np.sort(owners.unique())
    kept = sample_users(everyone, max(1, int(len(everyone) * max_events / n)), seed)
    keep = pd.Index(kept)
    history = validation.history.loc[owners.isin(keep).to_numpy()]
    targets = validation.targets.loc[
        validation.targets["user_id"].astype(str).isin(keep).to_numpy()
    ]
    return Round(validation.name, history, targets)


def basket_sample(basket: BasketRound, kept: Round, max_users: int, seed: int) -> BasketRound:
    """`basket` on the users `kept` (a `subsample_round` of its history) still holds, at most
    `max_users` of them (seeded); its history becomes `kept`'s."""
    owners = set(kept.history["user_id"].astype(str))
    users = sample_users(np.array([u for u in basket.user_ids if u in owners]), max_users, seed)
    keep = pd.Index(users)
    return BasketRound(
        basket.name,
        kept.history,
        basket.targets.loc[basket.targets["user_id"].astype(str).isin(keep).to_numpy()],
        basket.prefix.loc[basket.prefix["user_id"].astype(str).isin(keep).to_numpy()],
    )


def search_settings(
    settings: TrainingSettings,
    validation: Round,
    items: ItemTable,
    *,
    basket: BasketRound | None = None,
    log_trial: Callable[[int, dict[str, Any], dict[str, float], str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Choose the searchable settings on `validation` within the budget (see the module). With a
    non-empty `basket` round (the within-order hold-out of the same history), every trial's bundle
    also answers its users with their order prefix in the state, and the objective is the mean of
    the two rounds' NDCG@10."""
    config = settings.search
    pinned = pinned_settings(settings)
    searched = [name for name in SPACE if name not in pinned]
    result = SearchResult(settings, {}, searched, pinned)
    if config.budget_seconds <= 0 or not searched:
        return result
    started = time.monotonic()
    validation = subsample_round(validation, config.max_events, config.seed)
    data = Log.of(validation.history, items)
    result.events = len(validation.history)
    users = sample_users(validation.user_ids, config.max_users, config.seed)
    relevant = validation.relevant(items.index, users)
    parts = np.array_split(np.arange(len(users)), min(config.chunks, len(users)))
    # The within-order round: its users' states read from the history with their prefix in it.
    rounds = {"time": (data, users, relevant, parts)}
    if basket is not None:
        basket = basket_sample(basket, validation, config.max_users, config.seed)
        if len(basket.user_ids):
            b_users = basket.user_ids
            rounds["basket"] = (
                Log.of(basket.history_with_prefix, items),
                b_users,
                basket.relevant(items.index, b_users),
                np.array_split(np.arange(len(b_users)), len(parts)),
            )
    by_trial: dict[int, dict[str, float]] = {}
    # A completed trial's NDCG@10 per user, by round: what `paired_gain` compares.
    per_user: dict[int, dict[str, np.ndarray]] = {}
    cache = FitCache()
    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=5)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    given = {name: setting(settings, name) for name in searched}
    study.enqueue_trial(given)
    # The second trial asks the largest question first: the same without collaborative models
    # (decisive on purchase logs, not on every log); it reuses the first trial's towers.
    cf_off = {
        n: False
        for n in (
            "collaborative.ease",
            "collaborative.transitions",
            "collaborative.knn",
            "collaborative.basket",
        )
    }
    if set(cf_off) <= set(searched) and any(given[n] for n in cf_off):
        study.enqueue_trial({**given, **cf_off})
    # The enqueued questions are always answered, in full: the second one reuses the first's
    # towers, so it costs a ranker fit and a scoring, and cutting it at the budget threw away the
    # one comparison the search exists to make (at --size large it led, 0.063 against 0.059, when
    # the budget pruned it).
    enqueued = len(study.trials)

    tower_seconds: list[float] = []  # what fitting the towers of one label scheme took

    def objective(trial: optuna.Trial) -> float:
        values = {name: SPACE[name](trial, name) for name in searched}
        trial_settings = with_values(settings, values)
        new_towers = trial_settings.split.ranker_labels not in cache.ranking_towers
        left = config.budget_seconds - (time.monotonic() - started)
        if new_towers and tower_seconds and tower_seconds[0] > left:
            raise optuna.TrialPruned("no time left to train towers for another label scheme")
        fit_started = time.monotonic()
        fitted = fit_system(trial_settings, data, items, cache)
        if new_towers and not tower_seconds:
            tower_seconds.append(time.monotonic() - fit_started)
        with tempfile.TemporaryDirectory() as tmp:
            write_bundle(Path(tmp) / "bundle", trial_settings, fitted, data, items, snapshot="")
            served = Served(Path(tmp) / "bundle", data)
            # Each user's NDCG@10 once, as their part is served: the running score of a round
            # is the mean over the users scored so far, and the whole arrays are what
            # `paired_gain` compares (NaN: not scored yet, or nothing relevant).
            ndcg = {name: np.full(len(r[1]), np.nan) for name, r in rounds.items()}
            value = 0.0
            for step in range(len(parts)):
                scores: dict[str, float] = {}
                for name, (r_data, r_users, r_relevant, r_parts) in rounds.items():
                    part = r_parts[step]
                    if len(part):
                        lists = served.lists(r_users[part], 10, data=r_data)
                        ndcg[name][part] = ndcg_per_user(lists, [r_relevant[i] for i in part], 10)
                    done = np.concatenate(r_parts[: step + 1])
                    if len(done):  # a small round's first parts can be empty
                        scores[name] = mean_ndcg(ndcg[name][done])
                value = float(np.mean(list(scores.values())))
                by_trial[trial.number] = scores
                trial.report(value, step)
                # Out of time: stop, unless this is an enqueued question (the given settings,
                # the same without collaborative models: always scored in full).
                over = (
                    time.monotonic() - started > config.budget_seconds and trial.number >= enqueued
                )
                if step < len(parts) - 1 and (over or trial.should_prune()):
                    raise optuna.TrialPruned()
        per_user[trial.number] = ndcg
        return value

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = trial.state.name
        value = (
            trial.value
            if trial.value is not None
            else max(trial.intermediate_values.values(), default=math.nan)
        )
        per_round = by_trial.get(trial.number, {})
        result.trials.append(
            {"number": trial.number, "state": state, "ndcg@10": value, "by_round": per_round}
        )
        if log_trial is not None:
            figures = {"validation_ndcg@10": value}
            figures.update({f"validation_{name}_ndcg@10": v for name, v in per_round.items()})
            log_trial(trial.number, dict(trial.params), figures, state)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = study.best_value if done else math.nan
        if progress is not None:
            parts_text = ", ".join(f"{name} {v:.4f}" for name, v in per_round.items())
            progress(
                f"trial {trial.number} {state.lower()}: validation NDCG@10 {value:.4f} "
                f"({parts_text}) "
                f"(best {best:.4f}, {time.monotonic() - started:.0f}/"
                f"{config.budget_seconds:.0f} s)"
            )

    # The enqueued questions first, whatever the budget; then Optuna's own in what is left.
    questions = min(enqueued, config.max_trials)
    study.optimize(
        objective, n_trials=questions, callbacks=[after], catch=(ValueError, RuntimeError)
    )
    left = config.budget_seconds - (time.monotonic() - started)
    if config.max_trials > questions and left > 0:
        study.optimize(
            objective,
            n_trials=config.max_trials - questions,
            timeout=left,
            callbacks=[after],
            catch=(ValueError, RuntimeError),
        )
    result.seconds = time.monotonic() - started
    result.users = len(users)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        first = study.trials[0]
        result.best_trial = best.number
        if best.number != first.number and first.number in per_user:
            round_users = {name: r[1] for name, r in rounds.items()}
            result.gain, result.gain_se = paired_gain(
                per_user[first.number], per_user[best.number], round_users
            )
            if not result.gain > config.min_gain_z * result.gain_se:
                result.kept_given = True
                best = first
        result.chosen = {name: best.params[name] for name in searched}
        result.settings = with_values(settings, result.chosen)
        result.best_ndcg10 = float(best.value) if best.value is not None else math.nan
        result.best_by_round = by_trial.get(best.number, {})
        first_value = first.value if first.state == optuna.trial.TrialState.COMPLETE else None
        result.given_ndcg10 = float(first_value) if first_value is not None else math.nan
    return result
