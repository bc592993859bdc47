"""Feast entities: the user and the item, each keyed by its opaque string id."""

from __future__ import annotations

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="An end user, keyed by the id events and requests carry.",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalog item, keyed by its catalog id.",
)
