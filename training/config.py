"""Training settings: the one place the offline pipeline's defaults live.

Sources, highest first: explicit arguments (CLI flags), environment variables (`RECSERVE_*`, nested with
`__`, e.g. `RECSERVE_TWO_TOWER__EPOCHS=3`), a YAML file (`RECSERVE_CONFIG` or `--config`), the defaults here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from feature_repo.config import FeatureStoreConfig


class SyntheticConfig(BaseModel):
    """Sizes and strength of the planted structure of the generated data set."""

    model_config = ConfigDict(extra="forbid")

    n_users: int = Field(5_000, ge=1, description="users")
    n_items: int = Field(2_000, ge=2, description="items")
    n_events: int = Field(300_000, ge=1, description="approximate number of events")
    n_categories: int = Field(20, ge=1, description="item categories")
    latent_dim: int = Field(16, ge=2, description="dimension of the planted preference space")
    days: int = Field(60, ge=1, description="time span of the log")
    zipf_exponent: float = Field(0.7, ge=0.0, description="item popularity skew (Zipf exponent)")
    seed: int = 0


# Named sizes of the generated data set: tiny for tests, default for the demo, large and xl for the
# scale benchmarks (`recserve train --size`, bench/generate.py, bench/scale.py).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_users": 300, "n_items": 200, "n_events": 12_000, "n_categories": 8},
    "default": {"n_users": 5_000, "n_items": 2_000, "n_events": 300_000, "n_categories": 20},
    "large": {"n_users": 200_000, "n_items": 100_000, "n_events": 3_000_000, "n_categories": 100},
    "xl": {"n_users": 1_000_000, "n_items": 1_000_000, "n_events": 10_000_000, "n_categories": 500},
}


class TwoTowerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding_dim: int = Field(64, ge=4)
    hidden_dim: int = Field(128, ge=4)
    user_buckets: int = Field(50_000, ge=1, description="hash buckets for user ids")
    item_buckets: int = Field(100_000, ge=1, description="hash buckets for item ids")
    token_buckets: int = Field(20_000, ge=1, description="hash buckets for title tokens")
    max_title_tokens: int = Field(8, ge=1)
    history_length: int = Field(20, ge=1, description="recent items fed to the user tower")
    user_id_dropout: float = Field(
        0.5, ge=0.0, le=1.0, description="share of rows trained without the user id (cold users)"
    )
    temperature: float = Field(0.2, gt=0.0, description="softmax temperature of the InfoNCE loss")
    logq_strength: float = Field(
        1.0, ge=0.0, le=1.0, description="share of the sampled-softmax log-Q correction applied"
    )
    batch_size: int = Field(1024, ge=2)
    learning_rate: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-6, ge=0.0)
    epochs: int = Field(8, ge=1)
    patience: int = Field(2, ge=1, description="epochs without validation gain before stopping")
    refit_epochs: int = Field(
        2,
        ge=1,
        description="epochs over a bundle's whole log, continuing from the towers trained without "
        "the ranker's labels (so the served towers know the newest items and users)",
    )
    min_weight: float = Field(
        0.5, ge=0.0, description="events below this weight (views) are not training positives"
    )
    position_bias_power: float = Field(
        1.0, ge=0.0, description="inverse-propensity exponent for clicks at known positions"
    )
    max_ipw: float = Field(5.0, ge=1.0, description="cap on the position-bias correction weight")
    sparse_embeddings_min_items: int = Field(
        20_000,
        ge=1,
        description="from this catalog size on, the id, history and title-token tables train with "
        "sparse gradients (SparseAdam, a step costs O(batch) instead of O(table)); below it every "
        "parameter trains with AdamW, as the small catalogs were tuned with",
    )
    validation_max_users: int = Field(
        5_000,
        ge=1,
        description="validation users whose recall@50 stops the towers early (a seeded sample "
        "above this many; the demo data has 5,000 users in all): each epoch scores a bound",
    )
    validation_max_scores: int = Field(
        1_000_000_000,
        ge=1,
        description="bound on users x items scored per epoch for that recall: fewer validation "
        "users on a big catalog (1,000 at 1M items, where 5,000 took ~80 s an epoch on 2 cores); "
        "never fewer than 500",
    )
    threads: int = Field(2, ge=1)
    seed: int = 0


class IndexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact_threshold: int = Field(50_000, ge=1, description="below this many items: exact search")
    kind: Literal["hnsw", "ivf", "ivf_pq"] = Field(
        "ivf_pq",
        description="approximate index at or above exact_threshold (training/index.py: why)",
    )
    recall_floor: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="a bundle whose index recall@100 vs exact search, on sampled users' served "
        "vectors, stays below this (after widening the search) is refused",
    )
    check_users: int = Field(
        1_000, ge=1, description="users sampled for the build-time recall check"
    )
    build_threads: int = Field(
        2, ge=1, description="FAISS threads while building and checking (serving searches on 1)"
    )
    below_floor: Literal["exact", "refuse"] = Field(
        "exact",
        description="an approximate index still below the floor after widening its search: "
        "`exact` ships exact search instead (the manifest's index.fallback says why), `refuse` "
        "fails the bundle",
    )


class RankerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: int = Field(100, ge=10, description="retrieval candidates per user to rank")
    max_rounds: int = Field(600, ge=1)
    early_stopping_rounds: int = Field(
        30, ge=1, description="rounds without validation gain before the ranker stops"
    )
    learning_rate: float = Field(0.05, gt=0.0)
    max_depth: int = Field(4, ge=1)
    validation_share: float = Field(0.2, gt=0.0, lt=1.0, description="share of groups held out")
    max_groups: int = Field(
        40_000,
        ge=4,
        description="labelled users (groups) the ranker learns from: a seeded sample above this "
        "many, so candidates and features cost a bound, not the user count (demo data: fewer)",
    )
    max_candidate_scores: int = Field(
        4_000_000_000,
        ge=1,
        description="bound on groups x items scored for the groups' exact top candidates in one "
        "fit: fewer groups on a big catalog (4,000 at 1M items, where 40,000 groups cost ~10 min "
        "of a fit's argpartition on 2 cores); never fewer than 2,000; unchanged up to 100k items",
    )
    threads: int = Field(2, ge=1)
    seed: int = 0


class CollaborativeConfig(BaseModel):
    """Collaborative candidates and ranker features (serve_app.contract.CF_SIGNALS) in the bundle."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="fit them (searched: each model below on or off, all off = this off); off: "
        "the two-tower's candidates and the contract's ranker features only",
    )
    ease: bool = Field(True, description="EASE (signals ease and ease_last) on; off: empty")
    transitions: bool = Field(True, description="next-item transitions (signal next) on")
    knn: bool = Field(True, description="item-kNN (signal knn) on")
    basket: bool = Field(
        True,
        description="same-order co-occurrence (signal basket: item-kNN cosine over sessions, read"
        " from the newest basket_items items) on; a log without session ids fits an empty one",
    )
    basket_items: int = Field(10, ge=1, description="newest history items read by basket")
    basket_neighbors: int = Field(100, ge=1, description="basket neighbours per item")
    max_items: int = Field(
        20_000,
        ge=2,
        description="above this catalog size EASE (dense n x n) is not fit: off; transitions and "
        "item-kNN (sparse) stay on at any size",
    )
    knn_dense_max_items: int = Field(
        20_000,
        ge=1,
        description="item-kNN scores dense similarity blocks up to this many items (O(n^2) time);"
        " above, sparse co-occurrence in chunks (memory O(pairs))",
    )
    ease_lambda: float = Field(200.0, gt=0.0, description="EASE L2 weight")
    ease_top_k: int = Field(200, ge=1, description="EASE weights kept per item (largest first)")
    knn_neighbors: int = Field(100, ge=1, description="item-kNN neighbours per item")
    knn_shrink: float = Field(10.0, ge=0.0, description="item-kNN cosine shrinkage")
    next_gap: int = Field(3, ge=1, description="steps apart in a user's history still 'next'")
    last_items: int = Field(3, ge=1, description="newest history items read by ease_last/next")
    per_source: int = Field(50, ge=0, description="candidates each signal adds to retrieval's")


class SplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    holdout_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="per-user rounds (training.rounds): share of each user's first interactions "
        "held out for test, and again out of the rest for validation",
    )
    ranker_fraction: float = Field(
        0.8, gt=0.0, lt=1.0, description="window labels: time quantile where the window starts"
    )
    cold_user_max_events: int = Field(5, ge=0, description="users with at most this many: cold")
    ranker_labels: Literal["window", "tail"] = Field(
        "tail",
        description="ranker labels within the log a bundle is fit on: window = positives after "
        "its ranker_fraction time quantile, states at that moment; tail = each user's newest "
        "items, states just before them (a request in the middle of a visit)",
    )
    ranker_tail_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="tail labels: share of each user's items (at least 1)"
    )


class ColdStartConfig(BaseModel):
    """How a light user's list blends popularity and retrieval (served from the manifest)."""

    model_config = ConfigDict(extra="forbid")

    min_events: int = Field(
        5,
        ge=0,
        description="below this many interactions a user gets popularity blended in (retrieval "
        "weight = interactions / this); the bundle's value unless serving pins ranking."
        "cold_start_min_events",
    )


class SearchConfig(BaseModel):
    """The settings search of `recserve train` (training.search): Optuna on the validation round."""

    model_config = ConfigDict(extra="forbid")

    budget_seconds: float = Field(
        150.0,
        ge=0.0,
        description="wall time for trials (0: no search, the settings as given); sized so that "
        "`recserve train` on the demo data stays under 5 minutes on 2 cores",
    )
    max_trials: int = Field(40, ge=1, description="trials at most (the first: the settings given)")
    max_users: int = Field(
        2000, ge=10, description="validation users a trial is scored on (a fixed sample)"
    )
    chunks: int = Field(
        4, ge=1, description="parts a trial's users are scored in; each reports for pruning"
    )
    max_events: int = Field(
        1_000_000,
        ge=1_000,
        description="validation history larger than this: trials fit and score on a seeded sample "
        "of users holding about this many events (all of each sampled user's events, the whole "
        "catalog), so one trial fits in the budget; the demo data has fewer",
    )
    min_gain_z: float = Field(
        2.0,
        ge=0.0,
        description="the best trial replaces the settings as given only when its objective gain is "
        "at least this many standard errors of the paired per-user difference on the same "
        "validation users (0: the highest objective always wins); below it the gain is "
        "indistinguishable from which users were sampled, and the given settings are kept",
    )
    seed: int = 0


class EvaluationConfig(BaseModel):
    """The test round's table in `recserve train` (training.pipeline)."""

    model_config = ConfigDict(extra="forbid")

    max_users: int = Field(
        20_000,
        ge=1,
        description="test users every system is scored on: a seeded sample above this many (the "
        "table's `users` column says how many were scored; the demo data has fewer)",
    )
    seed: int = 0


class OnlineGateConfig(BaseModel):
    """The online A/B evidence `recserve promote` reads from the serving experiment's Redis record.

    Names must match the serving `ExperimentConfig` (serve_app/config.py): its `name`, `key_prefix`
    and the variant names of the current champion and the challenger.
    """

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("default", min_length=1, description="serving experiment name")
    key_prefix: str = Field("recserve:exp", min_length=1, description="its Redis key prefix")
    control: str = Field("champion", min_length=1, description="variant serving the champion")
    treatment: str = Field("challenger", min_length=1, description="variant serving the candidate")
    min_impressions: int = Field(
        1000, ge=1, description="served lists per variant before the online gate applies"
    )
    redis_timeout_seconds: float = Field(2.0, gt=0.0, description="Redis connect/read timeout")


class TrainingSettings(BaseSettings):
    """Everything the offline pipeline needs; create it once at the edge (CLI) and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="RECSERVE_", env_nested_delimiter="__", extra="forbid", yaml_file=None
    )

    data_dir: Path = Field(Path("data"), description="where data sets, bundles and MLflow live")
    dataset: Literal["synthetic", "movielens", "online-retail", "parquet"] = "synthetic"
    dataset_path: Path | None = Field(None, description="input for movielens/online-retail/parquet")
    model_name: str = Field("recserve", description="registered model name")
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "mlflow_tracking_uri", "MLFLOW_TRACKING_URI", "RECSERVE_MLFLOW_TRACKING_URI"
        ),
        description="MLflow tracking URI (also MLFLOW_TRACKING_URI); default sqlite:///<data_dir>/mlflow.db",
    )
    experiment: str = "recserve"
    register_bundle: bool = Field(True, description="register the bundle in MLflow")
    promotion_margin: float = Field(0.02, ge=0.0, description="relative NDCG@10 gain to promote")
    online_gate: OnlineGateConfig = Field(
        default_factory=OnlineGateConfig, description="online A/B evidence for promote"
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "REDIS_URL", "RECSERVE_REDIS_URL"),
        description="Redis for Feast's online store (redis profile) and the A/B record `promote` "
        "reads; None: embedded SQLite, no online evidence",
    )
    feature_store: FeatureStoreConfig = Field(default_factory=FeatureStoreConfig)
    synthetic: SyntheticConfig = SyntheticConfig()
    split: SplitConfig = SplitConfig()
    two_tower: TwoTowerConfig = TwoTowerConfig()
    index: IndexSettings = IndexSettings()
    ranker: RankerConfig = RankerConfig()
    collaborative: CollaborativeConfig = CollaborativeConfig()
    cold_start: ColdStartConfig = ColdStartConfig()
    search: SearchConfig = SearchConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _feature_store_defaults(self) -> TrainingSettings:
        # The feature store lives under the same data dir, and REDIS_URL selects its redis profile.
        update: dict[str, Any] = {"data_dir": self.data_dir}
        if self.redis_url and not self.feature_store.redis_url:
            update["redis_url"] = self.redis_url
        self.feature_store = FeatureStoreConfig.model_validate(
            {**self.feature_store.model_dump(), **update}
        )
        return self

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = settings_cls.model_config.get("yaml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> TrainingSettings:
    """Settings from defaults <- YAML file <- environment <- explicit overrides."""
    import os

    path = config_file or (
        Path(os.environ["RECSERVE_CONFIG"]) if "RECSERVE_CONFIG" in os.environ else None
    )

    class _Settings(TrainingSettings):
        model_config = SettingsConfigDict(yaml_file=path)

    # exclude_unset: what was set explicitly stays marked so (`model_fields_set`): pinned, not searched.
    return TrainingSettings.model_validate(_Settings(**overrides).model_dump(exclude_unset=True))
