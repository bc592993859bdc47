"""Feast feature services: exactly what each model version reads, one service per model version.

`user_tower_v1` feeds the user tower and the serving combination of base and delta embeddings;
`ranker_v1` feeds the ranker (user state plus the candidates' short-window counters). Both services
hold `recent_items` from two views (batch history and events since it): read them with
`full_feature_names=True`, or use `serve_app.features`, which merges the two lists.
"""

from __future__ import annotations

from feast import FeatureService

from feature_repo.views import item_realtime_fv, user_profile_fv, user_realtime_fv

user_tower_v1 = FeatureService(
    name="user_tower_v1",
    features=[
        user_profile_fv[["event_count", "category_prefs", "base_embedding", "recent_items"]],
        user_realtime_fv[["recent_items", "delta_embedding", "delta_model_version"]],
    ],
    description="User tower inputs (count, category shares, recent items) and embeddings.",
)

ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[
        user_profile_fv[["category_prefs", "event_count", "recent_items"]],
        user_realtime_fv[["recent_items"]],
        item_realtime_fv[["clicks_5m", "views_5m", "clicks_1h", "views_1h"]],
    ],
    description="Ranker inputs: user state plus candidates' short-window counters.",
)

SERVICES = (user_tower_v1, ranker_v1)


def feature_refs(service: FeatureService) -> list[str]:
    """The service's features as "view:feature" references, in definition order."""
    return [
        f"{projection.name_to_use()}:{feature.name}"
        for projection in service.feature_view_projections
        for feature in projection.features
    ]
