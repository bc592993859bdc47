"""Feature-store settings: which profile (embedded, redis, cluster) and where its files and servers are.

A plain pydantic model so that both the serving settings (`serve_app.config.ServeSettings`) and the
training CLI can nest it; neither reads the environment here. Profiles:
- `embedded` (default): SQLite online store and a file registry under `<data_dir>/feast/`; no server.
- `redis`: Redis online store at `redis_url`, file registry.
- `cluster`: Redis online store and a SQL registry (`registry_url`, PostgreSQL) shared by every pod.
`profile=None` picks `redis` when a Redis URL is configured and `embedded` otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Profile = Literal["embedded", "redis", "cluster"]
# Feast project names: letters, digits and underscores (they prefix online-store tables and keys).
_PROJECT = re.compile(r"^[A-Za-z0-9_]+$")


class FeatureStoreConfig(BaseModel):
    """Where the Feast registry, online store and batch sources live for one deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = Field(
        "recserve", description="Feast project (namespaces registry and online data)"
    )
    profile: Profile | None = Field(
        None, description="embedded | redis | cluster; None: redis when redis_url is set"
    )
    data_dir: Path = Field(
        Path("data"),
        description="batch sources are read from <data_dir>/features/*.parquet (Feast repo_path)",
    )
    redis_url: str | None = Field(
        None, description="redis://[user:pass@]host:port/db (online store)"
    )
    registry_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the SQL registry (cluster profile), "
        "e.g. postgresql+psycopg://feast@postgres:5432/feast",
    )
    registry_cache_ttl_seconds: int = Field(
        60, ge=0, description="how long a reader caches the registry before re-reading it"
    )
    online_timeout_seconds: float = Field(
        0.25, gt=0.0, description="socket timeout of the online store's Redis client"
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Feast resolves the online store path against its repo path (this dir): a relative
        # data dir would be applied twice.
        return value.resolve()

    @field_validator("project")
    @classmethod
    def _project_name(cls, value: str) -> str:
        if not _PROJECT.match(value):
            raise ValueError("may contain only letters, digits and underscores")
        return value

    @model_validator(mode="after")
    def _profile_needs(self) -> FeatureStoreConfig:
        profile = self.resolved_profile
        if profile in ("redis", "cluster") and not self.redis_url:
            raise ValueError(f"profile '{profile}' needs redis_url (REDIS_URL)")
        if profile == "cluster" and not self.registry_url:
            raise ValueError("profile 'cluster' needs registry_url (a PostgreSQL SQLAlchemy URL)")
        return self

    @property
    def resolved_profile(self) -> Profile:
        if self.profile is not None:
            return self.profile
        return "redis" if self.redis_url else "embedded"

    @property
    def feast_dir(self) -> Path:
        """Local files of the embedded profile: the registry and the SQLite online store."""
        return self.data_dir / "feast"
