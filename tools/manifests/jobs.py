"""Jobs and CronJobs, offline: what the API server's validation (not its OpenAPI schema) rejects, and what a
recurring job of this pipeline must declare.

- A Job's pod template has ``restartPolicy`` Never or OnFailure (the pod default, Always, is refused).
- A CronJob's ``schedule`` is a standard cron line (five fields, or a macro such as ``@weekly``) without a
  ``TZ=``/``CRON_TZ=`` prefix (Kubernetes >= 1.27 wants ``timeZone``), and its ``timeZone`` is a known IANA zone.
- A CronJob runs its Jobs one at a time (``concurrencyPolicy: Forbid``: two runs of the weekly cycle would append
  and promote concurrently), with a ``startingDeadlineSeconds``, and its Jobs end (``activeDeadlineSeconds``):
  under Forbid, one hung run would otherwise skip every later one.

``quantity_bytes`` reads a Kubernetes memory quantity ("1Gi", "512M", "1e9").
"""

from __future__ import annotations

import re
import zoneinfo
from typing import Any

Obj = dict[str, Any]

_MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_EVERY = re.compile(r"^@every\s+([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# (name, lowest, highest, names) of the five fields, as Kubernetes' parser (robfig/cron v3, standard) has them.
_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {name: i + 1 for i, name in enumerate(_MONTHS)}),
    ("day of week", 0, 6, {name: i for i, name in enumerate(_DAYS)}),
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)|[eE]([+-]?[0-9]+))?$")


def quantity_bytes(value: Any) -> float | None:
    """A memory quantity in bytes; None when it is not one."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        return None
    number, suffix, exponent = match.groups()
    if exponent is not None:
        return float(number) * 10 ** int(exponent)
    return float(number) * (_BINARY.get(suffix or "") or _DECIMAL[suffix or ""])


def _value(text: str, low: int, high: int, names: dict[str, int]) -> int | None:
    if text.upper() in names:
        return names[text.upper()]
    if text.isdigit() and low <= int(text) <= high:
        return int(text)
    return None


def _field_errors(text: str, name: str, low: int, high: int, names: dict[str, int]) -> list[str]:
    errors = []
    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            errors.append(f"{name} {part!r}: the step must be a positive number")
        if span in ("*", "?"):
            continue
        bounds = span.split("-")
        values = [_value(b, low, high, names) for b in bounds]
        if len(bounds) > 2 or any(v is None for v in values):
            errors.append(f"{name} {part!r} is outside {low}-{high}" + (" or the names" if names else ""))
        elif len(values) == 2 and values[0] > values[1]:
            errors.append(f"{name} {part!r}: the range runs backwards")
    return errors


def schedule_errors(schedule: Any) -> list[str]:
    if not isinstance(schedule, str) or not schedule.strip():
        return ["schedule is empty"]
    text = schedule.strip()
    if re.match(r"^(CRON_)?TZ=", text):
        return [f"schedule {schedule!r} sets its time zone in the schedule: use spec.timeZone (Kubernetes >= 1.27 "
                "refuses TZ= and CRON_TZ=)"]
    if text.startswith("@"):
        if text in _MACROS or _EVERY.match(text):
            return []
        return [f"schedule {schedule!r}: unknown macro (known: {', '.join(sorted(_MACROS))}, @every <duration>)"]
    fields = text.split()
    if len(fields) != 5:
        return [f"schedule {schedule!r} has {len(fields)} fields, not 5 (minute hour day-of-month month day-of-week)"]
    pairs = zip(fields, _FIELDS, strict=True)
    return [f"schedule {schedule!r}: {e}" for field, spec in pairs for e in _field_errors(field, *spec)]


def time_zone_errors(zone: Any) -> list[str]:
    if zone is None:
        return []
    try:
        zoneinfo.ZoneInfo(str(zone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return [f"timeZone {zone!r} is no IANA time zone"]
    return []


def restart_policy_errors(template: Obj) -> list[str]:
    policy = (template.get("spec") or {}).get("restartPolicy", "Always")
    if policy not in ("Never", "OnFailure"):
        return [f"pod template restartPolicy is {policy!r}: a Job's pods need Never or OnFailure"]
    return []


def errors(obj: Obj) -> list[str]:
    """The errors of a Job or CronJob, without the object's name (the caller prefixes it)."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Job":
        return restart_policy_errors(spec.get("template") or {})
    if obj.get("kind") != "CronJob":
        return []
    job = (spec.get("jobTemplate") or {}).get("spec") or {}
    found = schedule_errors(spec.get("schedule")) + time_zone_errors(spec.get("timeZone"))
    found += restart_policy_errors(job.get("template") or {})
    if spec.get("concurrencyPolicy", "Allow") != "Forbid":
        found.append(
            f"concurrencyPolicy is {spec.get('concurrencyPolicy', 'Allow (the default)')}: a pipeline run must not "
            "overlap the previous one (it appends weeks and promotes models), set Forbid"
        )
    if spec.get("startingDeadlineSeconds") is None:
        found.append("has no startingDeadlineSeconds: say how late a missed run may still start")
    if job.get("activeDeadlineSeconds") is None:
        found.append(
            "jobTemplate has no activeDeadlineSeconds: with concurrencyPolicy Forbid a hung run would skip every "
            "later one"
        )
    return found
