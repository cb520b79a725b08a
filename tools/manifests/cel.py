"""The CEL rules of the pinned CRDs (``x-kubernetes-validations``), evaluated as the API server does on create.

The API server evaluates each rule of a schema node against every value at that node that is present, with
``self`` bound to the (defaulted) value; at the root ``self.metadata`` holds only ``name`` and ``generateName``.
A rule that yields false rejects the object with its ``message`` (or ``messageExpression``), one that fails to
evaluate rejects it with the error. Evaluation uses cel-python (``celpy``, RE2 for ``matches`` as in Kubernetes).

What the pinned CRDs use, all standard CEL: ``self``, field selection, ``has()``, ``size()`` (function and
method), ``matches()``, ``in``, list literals, ``all``/``exists``/``filter`` macros, comparisons and logical
operators, and ``oldSelf``. None of Kubernetes' CEL extension libraries (lists, strings, url, quantity, ip,
cidr, format, semver) appears; a rule that calls a function celpy lacks is classified UNSUPPORTED, counted by
the tests, and never silently passed.

Rules that are not evaluated here, by category (``census()`` counts them):
- TRANSITION: rules that read ``oldSelf`` (immutability and other transition rules). The API server evaluates
  them only on update, against the stored object; on create they do not apply, and offline there is no stored
  object to compare with.
- UNSUPPORTED: ``optionalOldSelf`` rules (evaluated on create with ``oldSelf`` = ``optional.none()``; celpy has
  no optional types), rules under allOf/anyOf/oneOf/not, and rules calling functions celpy lacks. The pinned
  CRDs have none.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import celpy
import lark

from tools.manifests.crds import Crd, crd_index, defaulted

Obj = dict[str, Any]

EVALUATED, TRANSITION, UNSUPPORTED = "evaluated on create", "transition (oldSelf): update only", "unsupported"
MACROS = frozenset({"has", "all", "exists", "exists_one", "filter", "map"})
FUNCTIONS = frozenset(name for name in celpy.evaluation.base_functions if not name.startswith("_")) | MACROS
# celpy logs every evaluation error at WARNING; the validator reports them itself.
logging.getLogger("celpy").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Rule:
    path: str  # schema path of the node, e.g. ".spec.managedBy" or ".spec.runtimePatches[*].manager"
    rule: str
    message: str | None = None
    message_expression: str | None = None
    field_path: str | None = None
    optional_old_self: bool = False
    nested_in_combinator: bool = False

    @functools.cached_property
    def category(self) -> str:
        if self.nested_in_combinator or self.optional_old_self:
            return UNSUPPORTED
        try:
            tree = _compile(self.rule)
        except celpy.CELParseError:
            return UNSUPPORTED
        if "oldSelf" in _variables(tree):
            return TRANSITION
        return EVALUATED if _functions(tree) <= FUNCTIONS else UNSUPPORTED


@dataclass
class _Node:
    rules: list[Rule] = field(default_factory=list)
    properties: dict[str, _Node] = field(default_factory=dict)
    items: _Node | None = None
    additional: _Node | None = None

    def empty(self) -> bool:
        return not (self.rules or self.properties or self.items or self.additional)


def _rule_tree(schema: Obj, path: str = "", in_combinator: bool = False) -> _Node:
    """The schema reduced to the nodes that hold rules, or lead to them."""
    node = _Node()
    for spec in schema.get("x-kubernetes-validations") or []:
        node.rules.append(
            Rule(
                path or "<root>",
                spec["rule"],
                spec.get("message"),
                spec.get("messageExpression"),
                spec.get("fieldPath"),
                bool(spec.get("optionalOldSelf")),
                in_combinator,
            )
        )
    for name, sub in (schema.get("properties") or {}).items():
        child = _rule_tree(sub, f"{path}.{name}", in_combinator)
        if not child.empty():
            node.properties[name] = child
    for key, attr, suffix in (("items", "items", "[*]"), ("additionalProperties", "additional", "[*]")):
        if isinstance(schema.get(key), dict):
            child = _rule_tree(schema[key], f"{path}{suffix}", in_combinator)
            if not child.empty():
                setattr(node, attr, child)
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            node.rules += _all_rules(_rule_tree(sub, path, True))
    if isinstance(schema.get("not"), dict):
        node.rules += _all_rules(_rule_tree(schema["not"], path, True))
    return node


def _all_rules(node: _Node | None) -> list[Rule]:
    if node is None:
        return []
    rules = list(node.rules)
    for child in [*node.properties.values(), node.items, node.additional]:
        rules += _all_rules(child)
    return rules


@functools.cache
def _tree_of(api_version: str, kind: str) -> _Node:
    return _rule_tree(crd_index()[(api_version, kind)].schema)


def rules_of(crd: Crd) -> list[Rule]:
    return _all_rules(_tree_of(crd.api_version, crd.kind))


def census() -> dict[str, Counter]:
    """category -> Counter of (kind, rule) over every committed schema (all served versions)."""
    counts: dict[str, Counter] = {EVALUATED: Counter(), TRANSITION: Counter(), UNSUPPORTED: Counter()}
    for crd in crd_index().values():
        for rule in rules_of(crd):
            counts[rule.category][(f"{crd.api_version} {crd.kind}", f"{rule.path}: {rule.rule}")] += 1
    return counts


# --------------------------------------------------------------------------- CEL


@functools.cache
def _environment() -> celpy.Environment:
    return celpy.Environment()


@functools.cache
def _compile(expression: str) -> lark.Tree:
    return _environment().compile(expression)


@functools.cache
def _program(expression: str) -> celpy.Runner:
    return _environment().program(_compile(expression))


def _variables(tree: lark.Tree) -> set[str]:
    return {str(t.children[0]) for t in tree.find_data("ident")}


def _functions(tree: lark.Tree) -> set[str]:
    names = {str(t.children[0]) for t in tree.find_data("ident_arg")}
    names |= {str(t.children[0]) for t in tree.find_data("dot_ident_arg")}
    names |= {str(t.children[1]) for t in tree.find_data("member_dot_arg")}
    return names


def _typed(value: Any, schema: Obj) -> Any:
    """JSON numbers as the schema types them: a `number` is a CEL double even when written as 1."""
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        return {k: _typed(v, props.get(k) or (extra if isinstance(extra, dict) else {})) for k, v in value.items()}
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_typed(v, items) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _evaluate(expression: str, value: Any) -> Any:
    result = _program(expression).evaluate({"self": celpy.json_to_cel(value)})
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def _check(rule: Rule, value: Any, where: str) -> list[str]:
    location = where + (rule.field_path or "")
    try:
        ok = _evaluate(rule.rule, value)
    except (celpy.CELEvalError, TypeError, ValueError) as exc:
        detail = exc.args[0] if exc.args else exc
        return [
            f"{location or '<root>'}: rule `{rule.rule}` failed to evaluate ({detail}), which the API server "
            "rejects too"
        ]
    if ok is True or (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
        return []
    message = rule.message or f"failed rule: {rule.rule}"
    if rule.message_expression:
        with contextlib.suppress(celpy.CELEvalError, TypeError, ValueError):
            message = str(_evaluate(rule.message_expression, value))
    return [f"{location or '<root>'}: {message} (x-kubernetes-validations rule `{rule.rule}`)"]


def _walk(value: Any, node: _Node, schema: Obj, where: str) -> Iterator[str]:
    for rule in node.rules:
        if rule.category == EVALUATED:
            yield from _check(rule, _typed(value, schema), where)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name, child in node.properties.items():
            if name in value:
                yield from _walk(value[name], child, props.get(name) or {}, f"{where}.{name}")
        if node.additional is not None:
            for name, item in value.items():
                if name not in props:
                    yield from _walk(
                        item, node.additional, schema.get("additionalProperties") or {}, f"{where}[{name}]"
                    )
    elif isinstance(value, list) and node.items is not None:
        for i, item in enumerate(value):
            yield from _walk(item, node.items, schema.get("items") or {}, f"{where}[{i}]")


def rule_errors(obj: Obj, crd: Crd) -> list[str]:
    """The messages of every create-time rule the (defaulted) object breaks, with the field's path."""
    body = defaulted(obj, crd)
    # At the root, rules see only metadata.name and metadata.generateName.
    meta = body.get("metadata") or {}
    body["metadata"] = {k: meta[k] for k in ("name", "generateName") if k in meta}
    return list(_walk(body, _tree_of(crd.api_version, crd.kind), crd.schema, ""))
