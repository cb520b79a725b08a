"""What to read for each requested feature view, resolved from Feast's objects the way its SQL join does."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from feast.feature_view import FeatureView
from feast.infra.registry.base_registry import BaseRegistry
from feast.utils import _get_requested_feature_views_to_features_dict, _get_requested_on_demand_feature_views


@dataclass(frozen=True)
class ViewPlan:
    """One feature view of a request: its source columns and the output column of each feature."""

    name: str  # projection name, the prefix of full feature names
    source_sql: str  # the FROM expression: a quoted table or a parenthesized query
    join_keys: tuple[str, ...]  # columns of the entity set
    source_keys: tuple[str, ...]  # the matching source columns
    timestamp_field: str
    created_timestamp_column: str | None
    features: tuple[str, ...]  # source columns
    output_names: tuple[str, ...]
    ttl_seconds: int  # whole seconds, as Feast's SQL uses it; 0: no lower bound

    @property
    def ttl_ns(self) -> int | None:
        return self.ttl_seconds * 1_000_000_000 if self.ttl_seconds > 0 else None


def plan_views(feature_refs: list[str], feature_views: list[FeatureView], registry: BaseRegistry, project: str,
               full_feature_names: bool) -> list[ViewPlan]:
    """One plan per requested feature view, in request order (Feast's output column order)."""
    requested, _ = _get_requested_feature_views_to_features_dict(
        feature_refs, feature_views, _get_requested_on_demand_feature_views(feature_refs, project, registry))
    return [_plan_view(view, features, full_feature_names) for view, features in requested.items()]


def _plan_view(view: FeatureView, features: list[str], full_feature_names: bool) -> ViewPlan:
    source = view.batch_source
    if source is None:
        raise ValueError(f"Feature view '{view.name}' has no batch_source and cannot be queried.")
    reverse = {mapped: original for original, mapped in source.field_mapping.items()}
    name = view.projection.name_to_use()
    source_features = tuple(reverse.get(feature, feature) for feature in features)
    outputs = tuple(source.field_mapping.get(feature, feature) for feature in source_features)
    if full_feature_names:
        outputs = tuple(f"{name}__{output}" for output in outputs)
    ttl_seconds = int(view.ttl.total_seconds()) if isinstance(view.ttl, timedelta) else 0
    created = source.created_timestamp_column or None
    return ViewPlan(
        name=name,
        source_sql=source.get_table_query_string(),
        join_keys=tuple(view.projection.join_key_map.get(c.name, c.name) for c in view.entity_columns),
        source_keys=tuple(reverse.get(c.name, c.name) for c in view.entity_columns),
        timestamp_field=reverse.get(source.timestamp_field, source.timestamp_field),
        created_timestamp_column=reverse.get(created, created) if created else None,
        features=source_features,
        output_names=outputs,
        ttl_seconds=max(ttl_seconds, 0),
    )
