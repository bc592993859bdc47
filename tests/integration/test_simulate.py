"""Offline A/B simulation on real registry bundles: A/A gives no lift, a deliberately weak challenger
loses significantly (and wins when the roles swap), results depend only on the seed.

Two versions trained on the tiny generated data set in one MLflow registry, both without settings
search and without collaborative models (on generated data, with no baskets, they lower the simulated
CTR; what is compared here is the towers and the ranker): v1 with the default towers and ranker
(promoted champion), v2 with one epoch, a 4-dim tower and a one-tree ranker (challenger).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from serve_app.config import RankingConfig
from serve_app.models import ModelSource
from serve_app.recommend import ServingModel
from training.config import SyntheticConfig, TrainingSettings
from training.data import Dataset
from training.simulate import SimulationError, generated_dataset, load_variant, simulate

pytestmark = pytest.mark.integration

TINY = {"n_users": 300, "n_items": 200, "n_events": 12_000, "n_categories": 8}  # cli.SIZES["tiny"]
RANKING = RankingConfig()


@dataclass(frozen=True)
class Registry:
    settings: TrainingSettings
    source: ModelSource
    strong: ServingModel
    weak: ServingModel
    dataset: Dataset


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from training.data import write_dataset
    from training.pipeline import run_pipeline
    from training.registry import promote
    from training.synthetic import generate

    data_dir = tmp_path_factory.mktemp("simulate")
    settings = TrainingSettings(
        data_dir=data_dir,
        synthetic=SyntheticConfig(**TINY),
        redis_url=None,
        search={"budget_seconds": 0},  # no search: fast and fixed
        collaborative={"enabled": False},
    )
    dataset = generate(settings.synthetic, progress=False)
    write_dataset(dataset, data_dir / "datasets" / dataset.name)  # as `recserve train` does
    strong = run_pipeline(settings, dataset, progress=False).registered
    promote(tracking_uri=settings.tracking_uri, model_name="recserve", force=True)
    weak_settings = settings.model_copy(
        update={
            "two_tower": settings.two_tower.model_copy(
                update={"epochs": 1, "embedding_dim": 4, "hidden_dim": 4}
            ),
            "ranker": settings.ranker.model_copy(update={"max_rounds": 1}),
        }
    )
    weak = run_pipeline(weak_settings, dataset, progress=False).registered
    assert strong is not None and weak is not None
    assert (strong.version, weak.version) == ("1", "2")
    source = ModelSource(
        tracking_uri=settings.tracking_uri,
        model_name="recserve",
        alias="champion",
        cache_dir=data_dir / "bundle_cache",
    )
    champion = load_variant(source, "champion")
    challenger = load_variant(source, "challenger")
    return Registry(
        settings, source, champion, challenger, generated_dataset([champion, challenger], settings)
    )


def test_a_version_against_itself_has_zero_lift(registry: Registry) -> None:
    # The same version loaded twice (two fetch/verify/load round trips), as two variants.
    again = load_variant(registry.source, "1")
    assert again is not registry.strong and again.version == registry.strong.version == "1"
    report = simulate(
        registry.strong, again, registry.dataset, RANKING, runs=4, users=150, progress=False
    )
    assert len(report.runs) == 4
    for run in report.runs:
        assert run.expected_lift == 0.0
        assert run.lift == 0.0  # common random numbers: identical lists, identical clicks
        assert run.champion.impressions == run.challenger.impressions == 150 * 10
    assert report.ci_low <= 0.0 <= report.ci_high
    assert report.expected_ci_low <= 0.0 <= report.expected_ci_high
    assert report.bootstrap_low <= 0.0 <= report.bootstrap_high


def _random_list_ctr(dataset: Dataset, k: int) -> float:
    """Expected CTR of showing uniformly random items, from the planted model alone."""
    from training.synthetic import click_probability

    truth = dataset.truth
    n_users, n_items = len(truth["user_vectors"]), len(truth["item_vectors"])
    users, items = np.meshgrid(np.arange(n_users), np.arange(n_items), indexing="ij")
    p = [
        click_probability(truth, users.ravel(), items.ravel(), np.full(users.size, pos)).mean()
        for pos in range(k)
    ]
    return float(np.mean(p))


def test_weaker_challenger_loses_significantly_and_wins_when_roles_swap(
    registry: Registry,
) -> None:
    report = simulate(
        registry.strong, registry.weak, registry.dataset, RANKING, runs=5, users=200, progress=False
    )
    assert (report.champion.version, report.challenger.version) == ("1", "2")
    assert report.lift < 0 and report.ci_high < 0 and report.bootstrap_high < 0
    assert report.expected_lift < 0 and report.expected_ci_high < 0
    # Both beat showing random items, the trained one by more: the truth ranks them, not the code.
    random_ctr = _random_list_ctr(registry.dataset, 10)
    assert report.champion.expected_ctr > report.challenger.expected_ctr > random_ctr

    swapped = simulate(
        registry.weak, registry.strong, registry.dataset, RANKING, runs=5, users=200, progress=False
    )
    assert swapped.lift > 0 and swapped.ci_low > 0 and swapped.bootstrap_low > 0
    # Same users and clicks, roles swapped: the pooled CTRs trade places exactly.
    assert swapped.champion == report.challenger and swapped.challenger == report.champion


def test_same_seed_same_report_other_seed_other_sample(registry: Registry) -> None:
    def run(seed: int) -> dict[str, object]:
        return simulate(
            registry.strong,
            registry.weak,
            registry.dataset,
            RANKING,
            runs=2,
            users=100,
            seed=seed,
            bootstrap=300,
            progress=False,
        ).to_dict()

    first = run(11)
    assert run(11) == first
    assert run(12)["runs"] != first["runs"]


def test_dataset_is_regenerated_by_seed_and_other_data_is_refused(
    registry: Registry, tmp_path: Path
) -> None:
    from training.data import write_dataset
    from training.synthetic import generate

    # No stored copy under this data dir: regenerated from the synthetic config, same content.
    elsewhere = registry.settings.model_copy(update={"data_dir": tmp_path})
    regenerated = generated_dataset([registry.strong, registry.weak], elsewhere)
    np.testing.assert_array_equal(
        regenerated.truth["user_vectors"], registry.dataset.truth["user_vectors"]
    )
    other_seed = registry.settings.synthetic.model_copy(update={"seed": 1})
    with pytest.raises(SimulationError, match="not the one synthetic-300u-200i-seed0"):
        generated_dataset([registry.strong], elsewhere.model_copy(update={"synthetic": other_seed}))
    other = tmp_path / "other"
    write_dataset(generate(other_seed, progress=False), other)
    with pytest.raises(SimulationError, match="not the one"):
        generated_dataset([registry.strong], registry.settings, other)


def test_cli_simulates_champion_against_challenger_and_writes_json(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    out = tmp_path / "report.json"
    code = main(
        [
            *("simulate", "--data-dir", str(registry.settings.data_dir)),
            *("--runs", "3", "--users", "400", "--seed", "5", "--json", str(out)),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "champion v1 (champion) vs challenger v2 (challenger)" in printed
    assert "paired bootstrap" in printed
    report = json.loads(out.read_text())
    assert report["champion"]["version"] == "1" and report["challenger"]["version"] == "2"
    assert len(report["runs"]) == 3 and report["ci_high"] < 0
    assert report["challenger"]["ctr"] == pytest.approx(
        report["challenger"]["clicks"] / report["challenger"]["impressions"]
    )

    code = main(["simulate", "--data-dir", str(registry.settings.data_dir), "--champion", "7"])
    assert code == 2
    assert "no version 7" in capsys.readouterr().out
