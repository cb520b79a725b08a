"""The pinned CRD schemas committed in tools/manifests/schemas/ (see crd_schemas.py): loading, the API server's
defaulting, and the translation of a structural schema into a strict JSON Schema."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from tools.manifests.crd_schemas import SCHEMAS_DIR

Obj = dict[str, Any]


class SchemaSetupError(RuntimeError):
    """The committed schemas are missing: validation cannot run."""


@dataclass(frozen=True)
class Crd:
    api_version: str
    kind: str
    namespaced: bool
    source: dict[str, str]  # component, repository, tag, path, crd
    schema: Obj  # the structural schema as committed (with defaults and CEL rules)

    @functools.cached_property
    def strict(self) -> Obj:
        return strict_schema(self.schema)

    @property
    def origin(self) -> str:
        s = self.source
        return f"{s['repository']} @ {s['tag']}: {s['path']}"


@functools.cache
def crd_index(folder: Path = SCHEMAS_DIR) -> dict[tuple[str, str], Crd]:
    """(apiVersion, kind) -> Crd, for every committed schema."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise SchemaSetupError(
            f"no CRD schemas in {folder}: they are committed with the project; regenerate them with "
            "`python -m tools.manifests.crd_schemas <folder of the pinned CRD YAMLs>`"
        )
    index: dict[tuple[str, str], Crd] = {}
    for path in files:
        doc = json.loads(path.read_text())
        crd = Crd(doc["apiVersion"], doc["kind"], doc["scope"] == "Namespaced", doc["source"], doc["openAPIV3Schema"])
        index[(crd.api_version, crd.kind)] = crd
    return index


# --------------------------------------------------------------------------- defaulting


def apply_defaults(value: Any, schema: Obj) -> Any:
    """Default ``value`` in place as the API server does before validating: an absent property with a
    ``default`` gets it (recursively defaulted too); a null in a non-nullable property is dropped first."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name in value and value[name] is None and not sub.get("nullable"):
                del value[name]
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in props:
                    apply_defaults(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    return value


def defaulted(obj: Obj, crd: Crd) -> Obj:
    """A defaulted copy of a custom resource (metadata is left alone)."""
    return apply_defaults(copy.deepcopy(obj), crd.schema)


# --------------------------------------------------------------------------- strict JSON Schema


def strict_schema(node: Obj) -> Obj:
    """Structural-schema dialect -> JSON Schema, with unknown fields rejected (the API server's strict field
    validation), nullable and int-or-string translated, and list-type set/map uniqueness enforced. CEL rules are
    not part of it (see cel.py)."""
    out: Obj = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        elif key == "nullable" or key.startswith("x-kubernetes-") or key == "default":
            continue  # translated below; defaults are applied before validating (apply_defaults)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    elif node.get("x-kubernetes-list-type") == "map" and node.get("x-kubernetes-list-map-keys"):
        out[LIST_MAP_KEYS] = list(node["x-kubernetes-list-map-keys"])
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


LIST_MAP_KEYS = "listMapKeys"


def _list_map_keys(validator, keys, instance, schema):  # noqa: ARG001 - jsonschema's keyword signature
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
            yield jsonschema.ValidationError(f"duplicate entries for key ({shown}) at [{seen[key]}] and [{i}]")
        seen.setdefault(key, i)


StrictValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {LIST_MAP_KEYS: _list_map_keys})


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.Validator:
    return StrictValidator(crd_index()[(api_version, kind)].strict)


def schema_errors(obj: Obj, crd: Crd) -> list[jsonschema.ValidationError]:
    """JSON-Schema errors of the defaulted object (metadata is checked separately: the CRDs say only
    ``metadata: {type: object}``)."""
    body = {k: v for k, v in defaulted(obj, crd).items() if k != "metadata"}
    validator = _validator(crd.api_version, crd.kind)
    return sorted(validator.iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path])
