"""NetworkPolicies, offline: which pod templates a policy selects, which sources and ports it admits, which
services each pod talks to, and whether the policies let it.

A pod *talks to* a Service when it is given the Service's address or credentials:
- an environment variable whose value is a URL with the Service's host (``http://mlflow:5000``), or a
  ``*_HOST`` variable naming it (with the port from the matching ``*_PORT``), resolved through literal values,
  ``configMapKeyRef`` and ``envFrom`` (keys in ``by_name_only`` count only when taken by name, not through
  a whole-ConfigMap ``envFrom``);
- a URL with the Service's host in a container's command or arguments;
- a mounted ``feature_store.yaml`` whose hosts, expanded with the container's environment, name it;
- a Secret holding the Service's credentials (``credential_services``).
The Ray pods of a RayCluster talk to each other on every port (GCS, raylets, object managers, workers).

It is *admitted* when, for the target pod, either no NetworkPolicy with policy type Ingress selects it or one
of those policies has a rule whose peers match the source and whose ports include the target container port;
and likewise for the source's Egress policies. ``ipBlock`` peers are never taken to match a pod.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import yaml

Obj = dict[str, Any]
ALL_PORTS = "all ports"
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*)://([^\s'\"]+)")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-?[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "redis": 6379}


@dataclass
class PodView:
    """The pod a workload object will run, as far as it can be known offline."""

    owner: str
    namespace: str | None
    labels: dict[str, str]
    spec: Obj
    claim_templates: tuple[str, ...] = ()
    image_optional: bool = False  # a TrainJob without trainer.image runs the runtime's (pinned) image
    ray_cluster: str | None = None  # the RayCluster the pod belongs to
    ray_head: bool = False

    def containers(self) -> Iterator[Obj]:
        yield from self.spec.get("initContainers") or []
        yield from self.spec.get("containers") or []


# --------------------------------------------------------------------------- selectors


def selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """LabelSelector semantics: {} selects everything; matchLabels and matchExpressions all have to hold."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if (
            (op == "In" and not (present and labels[key] in values))
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def describe_selector(selector: Obj | None) -> str:
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        parts.append(f"{expr.get('key')} {expr.get('operator')} {expr.get('values') or ''}".rstrip())
    return "{" + ", ".join(parts) + "}" if parts else "{} (everything)"


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Port:
    """A target container port."""

    number: int | None
    name: str | None = None
    protocol: str = "TCP"

    def __str__(self) -> str:
        return f"{self.number}" + (f" ({self.name})" if self.name else "")


@dataclass
class Policy:
    obj: Obj

    @property
    def name(self) -> str:
        return f"NetworkPolicy/{(self.obj.get('metadata') or {}).get('name', '?')}"

    @property
    def namespace(self) -> str | None:
        return (self.obj.get("metadata") or {}).get("namespace")

    @property
    def spec(self) -> Obj:
        return self.obj.get("spec") or {}

    @property
    def types(self) -> set[str]:
        declared = self.spec.get("policyTypes")
        if declared:
            return set(declared)
        return {"Ingress"} | ({"Egress"} if "egress" in self.spec else set())

    def selects(self, view: PodView) -> bool:
        return view.namespace == self.namespace and selector_matches(self.spec.get("podSelector"), view.labels)

    def rules(self, direction: str) -> list[Obj]:
        return list(self.spec.get("ingress" if direction == "Ingress" else "egress") or [])


class Namespaces:
    """Namespace labels: those of the Namespace objects in the set, plus kubernetes.io/metadata.name."""

    def __init__(self, objs: Iterable[Obj]):
        self.labels = {
            (o.get("metadata") or {}).get("name"): dict((o.get("metadata") or {}).get("labels") or {})
            for o in objs
            if o.get("kind") == "Namespace"
        }

    def of(self, name: str | None) -> dict[str, str]:
        return {**self.labels.get(name, {}), "kubernetes.io/metadata.name": name or ""}


def peer_matches(peer: Obj, view: PodView, policy_ns: str | None, namespaces: Namespaces) -> bool:
    if "ipBlock" in peer:
        return False
    ns_selector = peer.get("namespaceSelector")
    in_namespace = (
        view.namespace == policy_ns
        if ns_selector is None
        else selector_matches(ns_selector, namespaces.of(view.namespace))
    )
    return in_namespace and ("podSelector" not in peer or selector_matches(peer["podSelector"], view.labels))


def ports_match(rule_ports: list[Obj] | None, port: Port | str) -> bool:
    if not rule_ports:
        return True
    if port == ALL_PORTS:
        return any("port" not in p and p.get("protocol", "TCP") == "TCP" for p in rule_ports)
    assert isinstance(port, Port)
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != port.protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            if wanted == port.name:
                return True
        elif port.number is not None and wanted <= port.number <= entry.get("endPort", wanted):
            return True
    return False


def _rule_admits(rule: Obj, peer_key: str, other: PodView, port: Port | str, policy: Policy, ns: Namespaces) -> bool:
    peers = rule.get(peer_key)
    matched = not peers or any(peer_matches(p, other, policy.namespace, ns) for p in peers)
    return matched and ports_match(rule.get("ports"), port)


def admitted(source: PodView, target: PodView, port: Port | str, policies: list[Policy], ns: Namespaces) -> bool:
    ingress = [p for p in policies if "Ingress" in p.types and p.selects(target)]
    if ingress and not any(_rule_admits(r, "from", source, port, p, ns) for p in ingress for r in p.rules("Ingress")):
        return False
    egress = [p for p in policies if "Egress" in p.types and p.selects(source)]
    return not egress or any(_rule_admits(r, "to", target, port, p, ns) for p in egress for r in p.rules("Egress"))


def admission_hint(target: PodView, policies: list[Policy]) -> str:
    """Who the policies selecting the target admit, for an error message."""
    parts = []
    for policy in (p for p in policies if "Ingress" in p.types and p.selects(target)):
        for rule in policy.rules("Ingress"):
            peers = ", ".join(
                "pods " + describe_selector(p.get("podSelector")) if "podSelector" in p else "other sources"
                for p in rule.get("from") or [{}]
            )
            ports = ", ".join(str(p.get("port", "all")) for p in rule.get("ports") or []) or "all ports"
            parts.append(f"{policy.name} admits {peers} on {ports}")
    return "; ".join(parts) or "no NetworkPolicy selects it"


# --------------------------------------------------------------------------- policy checks


def selector_errors(policy: Policy, views: list[PodView], peers: list[PodView] | None = None) -> list[str]:
    """Every selector of the policy selects a pod template (a typo would select nothing): its podSelector one of
    the set, its peers' podSelectors one of ``peers`` (default: the set; clients may be applied separately)."""
    local = [v for v in views if v.namespace == policy.namespace]
    local_peers = [v for v in (views if peers is None else peers) if v.namespace == policy.namespace]
    errors = []
    target = policy.spec.get("podSelector")
    if target and not any(selector_matches(target, v.labels) for v in local):
        errors.append(f"{policy.name}: podSelector {describe_selector(target)} selects no pod template")
    for direction, key in (("Ingress", "from"), ("Egress", "to")):
        for rule in policy.rules(direction):
            for peer in rule.get(key) or []:
                selector = peer.get("podSelector")
                if (
                    selector
                    and "namespaceSelector" not in peer
                    and not any(selector_matches(selector, v.labels) for v in local_peers)
                ):
                    errors.append(
                        f"{policy.name}: {direction.lower()} podSelector {describe_selector(selector)} selects no pod"
                        " template"
                    )
    return errors


def open_rule_errors(policy: Policy) -> list[str]:
    """Ingress rules that admit every source, every pod of the namespace, or every namespace."""
    errors = []
    for i, rule in enumerate(policy.rules("Ingress")):
        peers = rule.get("from") or []
        where = f"{policy.name}: ingress[{i}]"
        if not peers:
            errors.append(f"{where} has no `from`: it admits every source")
        for peer in peers:
            if "namespaceSelector" in peer and not (peer["namespaceSelector"] or {}):
                errors.append(f"{where} admits every namespace (namespaceSelector: {{}})")
            elif "podSelector" in peer and not (peer["podSelector"] or {}) and "namespaceSelector" not in peer:
                errors.append(f"{where} admits every pod of the namespace (podSelector: {{}})")
    return errors


# --------------------------------------------------------------------------- who talks to whom


@dataclass
class Endpoint:
    """A Service (or a KubeRay head Service) and the pods behind it."""

    name: str
    namespace: str | None
    ports: list[tuple[int, int | str, str]]  # (port, targetPort, protocol)
    targets: list[PodView]


@dataclass
class Need:
    source: PodView
    target: PodView
    port: Port | str
    service: str
    reason: str
    container: str | None = None  # the source container that holds the address or credentials


@dataclass
class EnvValue:
    value: str | None  # None: from a Secret, or unresolvable
    how: str  # "literal", "by name" (configMapKeyRef/secretKeyRef) or "envFrom"
    secret: str | None = None


def hosts_of(name: str, namespace: str | None) -> list[str]:
    ns = namespace or "default"
    return [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]


def container_env(
    container: Obj, config_maps: dict[tuple[str | None, str], Obj], ns: str | None
) -> dict[str, EnvValue]:
    """The container's environment as far as the object set tells: envFrom first, env entries override."""
    env: dict[str, EnvValue] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        if "configMapRef" in source:
            data = (config_maps.get((ns, source["configMapRef"].get("name"))) or {}).get("data") or {}
            for key, value in data.items():
                env[prefix + key] = EnvValue(str(value), "envFrom")
    for entry in container.get("env") or []:
        name = entry.get("name")
        if "value" in entry:
            env[name] = EnvValue(str(entry["value"]), "literal")
            continue
        ref = (entry.get("valueFrom") or {}).get("configMapKeyRef")
        if ref:
            data = (config_maps.get((ns, ref.get("name"))) or {}).get("data") or {}
            value = data.get(ref.get("key"))
            env[name] = EnvValue(None if value is None else str(value), "by name")
        secret = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if secret:
            env[name] = EnvValue(None, "by name", secret.get("name"))
    return env


def secrets_taken(container: Obj) -> set[str]:
    names = {(s.get("secretRef") or {}).get("name") for s in container.get("envFrom") or []}
    names |= {((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") for e in container.get("env") or []}
    return {n for n in names if n}


def expand(value: str, env: dict[str, EnvValue]) -> str:
    def substitute(match: re.Match) -> str:
        found = env.get(match.group(1) or match.group(2))
        return found.value if found and found.value is not None else match.group(0)

    return _ENV_REF.sub(substitute, value)


@dataclass
class Traffic:
    """Works out the needs of every pod view of an object set."""

    objs: list[Obj]
    views: list[PodView]
    by_name_only: frozenset[str] = frozenset()
    credential_services: dict[str, str] = field(default_factory=dict)  # Secret name -> Service name
    feature_store_configmap: tuple[str, str] | None = None  # (ConfigMap, key) holding feature_store.yaml

    def __post_init__(self) -> None:
        self.config_maps = {
            ((o.get("metadata") or {}).get("namespace"), (o.get("metadata") or {}).get("name")): o
            for o in self.objs
            if o.get("kind") == "ConfigMap"
        }
        self.endpoints: dict[tuple[str | None, str], Endpoint] = {}
        for obj in self.objs:
            meta = obj.get("metadata") or {}
            if obj.get("kind") == "Service" and (obj.get("spec") or {}).get("selector"):
                selector = {"matchLabels": obj["spec"]["selector"]}
                targets = [
                    v
                    for v in self.views
                    if v.namespace == meta.get("namespace") and selector_matches(selector, v.labels)
                ]
                ports = [
                    (p.get("port"), p.get("targetPort", p.get("port")), p.get("protocol", "TCP"))
                    for p in obj["spec"].get("ports") or []
                ]
                self._add(Endpoint(meta.get("name"), meta.get("namespace"), ports, targets))
            elif obj.get("kind") == "RayCluster":
                heads = [
                    v
                    for v in self.views
                    if v.ray_cluster == meta.get("name") and v.ray_head and v.namespace == meta.get("namespace")
                ]
                ports = [(p.number, p.number, p.protocol) for v in heads for p in container_ports(v)]
                self._add(Endpoint(f"{meta.get('name')}-head-svc", meta.get("namespace"), ports, heads))

    def _add(self, endpoint: Endpoint) -> None:
        ns = endpoint.namespace
        for host in hosts_of(endpoint.name, ns):
            # a short name resolves in the client's own namespace, the qualified ones from anywhere
            self.endpoints[(ns if host == endpoint.name else None, host)] = endpoint

    def endpoint(self, host: str, client_ns: str | None) -> Endpoint | None:
        return self.endpoints.get((client_ns, host)) or self.endpoints.get((None, host))

    def needs(self) -> list[Need]:
        found: list[Need] = []
        for view in self.views:
            found += self._needs_of(view)
        return found

    def _needs_of(self, view: PodView) -> list[Need]:
        needs: list[Need] = []
        for container in view.containers():
            start = len(needs)
            label = f"container {container.get('name')!r}"
            env = container_env(container, self.config_maps, view.namespace)
            for name, item in env.items():
                if item.value is None or (item.how == "envFrom" and name in self.by_name_only):
                    continue
                needs += self._address_needs(view, item.value, f"{label} {name}={item.value}", env, name)
            for arg in [*(container.get("command") or []), *(container.get("args") or [])]:
                for match in _URL.finditer(str(arg)):
                    needs += self._url_needs(view, match.group(0), f"{label} argument {match.group(0)}")
            for secret in secrets_taken(container):
                service = self.credential_services.get(secret)
                endpoint = self.endpoint(service, view.namespace) if service else None
                if endpoint:
                    needs += self._to(view, endpoint, None, f"{label} gets Secret {secret}")
            needs += self._feature_store_needs(view, container, env, label)
            for need in needs[start:]:
                need.container = container.get("name")
        if view.ray_cluster:
            for other in self.views:
                if other.ray_cluster == view.ray_cluster and other.namespace == view.namespace:
                    needs.append(
                        Need(
                            view,
                            other,
                            ALL_PORTS,
                            f"RayCluster {view.ray_cluster}",
                            "Ray pods talk to each other (GCS, raylets, object managers, workers)",
                        )
                    )
        return needs

    def _address_needs(self, view: PodView, value: str, reason: str, env: dict[str, EnvValue], name: str) -> list[Need]:
        if "://" in value:
            return self._url_needs(view, value, reason)
        endpoint = self.endpoint(value, view.namespace) if name.endswith("_HOST") else None
        if endpoint is None:
            return []
        port_value = env.get(name[: -len("_HOST")] + "_PORT")
        port = int(port_value.value) if port_value and (port_value.value or "").isdigit() else None
        return self._to(view, endpoint, port, reason)

    def _url_needs(self, view: PodView, url: str, reason: str) -> list[Need]:
        try:
            parsed = urlparse(url)
            port = parsed.port
        except ValueError:
            return []
        endpoint = self.endpoint(parsed.hostname or "", view.namespace)
        if endpoint is None:
            return []
        return self._to(view, endpoint, port or _DEFAULT_PORTS.get(parsed.scheme.split("+")[0]), reason)

    def _feature_store_needs(self, view: PodView, container: Obj, env: dict[str, EnvValue], label: str) -> list[Need]:
        if not self.feature_store_configmap:
            return []
        name, key = self.feature_store_configmap
        volumes = {
            v.get("name") for v in view.spec.get("volumes") or [] if (v.get("configMap") or {}).get("name") == name
        }
        if not any(
            m.get("name") in volumes and m.get("subPath", key) == key for m in container.get("volumeMounts") or []
        ):
            return []
        text = ((self.config_maps.get((view.namespace, name)) or {}).get("data") or {}).get(key)
        if not text:
            return []
        needs = []
        for path, value, parent in walk_strings(yaml.safe_load(text)):
            expanded = expand(value, env)
            reason = f"{label} mounts {key} ({path}={expanded})"
            if path.rsplit(".", 1)[-1] == "host":
                port = expand(str(parent.get("port", "")), env)
                endpoint = self.endpoint(expanded, view.namespace)
                if endpoint:
                    needs += self._to(view, endpoint, int(port) if port.isdigit() else None, reason)
            elif "://" in expanded:
                needs += self._url_needs(view, expanded, reason)
        return needs

    def _to(self, view: PodView, endpoint: Endpoint, port: int | None, reason: str) -> list[Need]:
        """Needs towards every pod behind the endpoint, on the container port the Service port maps to
        (port None: on each of the Service's ports). A server given its own address or credentials is no client."""
        needs = []
        ports = [p for p in endpoint.ports if port is None or p[0] == port]
        for target in (t for t in endpoint.targets if t is not view):
            resolved = [resolve_target_port(target, target_port, protocol) for _, target_port, protocol in ports]
            for resolved_port in resolved[:1] if port is not None else resolved:
                if resolved_port is not None:
                    needs.append(Need(view, target, resolved_port, endpoint.name, reason))
        return needs


def container_ports(view: PodView) -> list[Port]:
    return [
        Port(p.get("containerPort"), p.get("name"), p.get("protocol", "TCP"))
        for c in view.spec.get("containers") or []
        for p in c.get("ports") or []
    ]


def resolve_target_port(view: PodView, target_port: int | str, protocol: str) -> Port | None:
    for port in container_ports(view):
        if port.protocol == protocol and (port.name == target_port or port.number == target_port):
            return port
    return Port(target_port, None, protocol) if isinstance(target_port, int) else None


def walk_strings(node: Any, prefix: str = "", parent: Obj | None = None) -> Iterator[tuple[str, str, Obj]]:
    """(dotted key path, string value, the dict holding it) for every string leaf."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(value, f"{prefix}.{key}" if prefix else str(key), node)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_strings(value, f"{prefix}[{i}]", parent)
    elif isinstance(node, str):
        yield prefix, node, parent or {}


def admission_errors(traffic: Traffic, policies: list[Policy], namespaces: Namespaces) -> list[str]:
    """Every need the policies block, once per (source, target, port)."""
    errors, seen = [], set()
    for need in traffic.needs():
        key = (id(need.source), id(need.target), str(need.port))
        if key in seen:
            continue
        seen.add(key)
        if not admitted(need.source, need.target, need.port, policies, namespaces):
            port = need.port if need.port == ALL_PORTS else f"port {need.port}"
            errors.append(
                f"{need.source.owner}: talks to {need.service} ({need.target.owner}, {port}) because its "
                f"{need.reason}, but no NetworkPolicy admits it ({admission_hint(need.target, policies)})"
            )
    return errors
