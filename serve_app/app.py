"""Application builder of the online graph: `build_app(args)` binds every deployment once, one per
group of stages the `placement` setting names (serve_app/placement.py).

Works with `serve run serve_app.app:build_app [settings=...]`, with the Serve config file
(`serve run serve_app/serve_config.yaml`, whose `args` become `AppArgs`) and with `recserve-serve`.
Deployment options come from `serve_config.yaml` (for the placement) plus `RECSERVE_DEPLOYMENT__*`
overrides unless the args carry them; graph settings from `ServeSettings` (environment) plus
`args.settings`.
"""

# No `from __future__ import annotations`: Serve reads the builder's parameter annotation as a class
# to validate the args dict into `AppArgs`.

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from serve_app.config import ServeSettings, deployment_options, serve_config
from serve_app.deployments.group import StageGroup
from serve_app.event_writer import EventWriter
from serve_app.ingress import Ingress
from serve_app.placement import resolve_placement


class AppArgs(BaseModel):
    """Arguments of the application builder (the Serve config's `applications[].args`)."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="ServeSettings fields (nested dicts) overriding the RECSERVE_* environment",
    )
    deployments: dict[str, dict[str, Any]] | None = Field(
        None,
        description="per-deployment Serve options by deployment name; None: serve_config.yaml "
        "for the placement, with RECSERVE_DEPLOYMENT__* overrides",
    )


def build_app(args: AppArgs) -> Application:
    """The graph: Ingress (with its Router) -> one deployment per group of stages (split:
    UserTower -> Retriever -> Ranker -> ReRanker; fused: none, the stages run in the Ingress), and
    Ingress -> EventWriter."""
    settings = ServeSettings(**args.settings)
    options = args.deployments
    if options is None:
        options = deployment_options(serve_config(dict(os.environ), placement=settings.placement))

    def bind(deployment: Any, *init_args: Any, name: str | None = None) -> Application:
        # `@serve.deployment` turns each class into a Deployment (its stubs keep the class type).
        name = name or deployment.name
        bound: Application = deployment.options(name=name, **options.get(name, {})).bind(*init_args)
        return bound

    groups = [
        bind(StageGroup, settings, group.stages, name=group.name)
        for group in resolve_placement(settings.placement)
        if not group.in_ingress
    ]
    events = bind(EventWriter, settings)
    return bind(Ingress, settings, events, *groups)
