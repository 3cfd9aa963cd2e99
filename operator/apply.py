"""Idempotent apply, decided without I/O: given what we want and what the API server has, what to send.

A client-side apply in the way of `kubectl apply`: the last applied manifest rides in an annotation, so
a field we stop rendering is removed (JSON merge patch with null) without touching fields the API
server or other controllers own. No write happens when the object already holds what we want, which
makes a second reconcile free.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

LAST_APPLIED = "kubellm.io/last-applied"

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[numkMGTPE]|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(value: str | int | float) -> Decimal | None:
    """A Kubernetes quantity's value, or None when it is not one (the API server rewrites '1024Mi' as '1Gi')."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    m = _QUANTITY.match(value.strip())
    if not m:
        return None
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        return None
    suffix = m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * _SUFFIX[suffix]


def _scalar_equal(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    if isinstance(want, str | int) and isinstance(have, str | int) and not isinstance(want, bool):
        a, b = parse_quantity(want), parse_quantity(have)
        return a is not None and a == b
    return False


def is_subset(want: Any, have: Any) -> bool:
    """Whether `have` holds everything in `want`; lists must match item by item (server defaults may add keys)."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return False
        return all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return False
        return all(is_subset(w, h) for w, h in zip(want, have, strict=True))
    return _scalar_equal(want, have)


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def with_last_applied(desired: dict[str, Any]) -> dict[str, Any]:
    """The manifest to send: `desired` plus the annotation recording it."""
    out = copy.deepcopy(desired)
    out.setdefault("metadata", {}).setdefault("annotations", {})[LAST_APPLIED] = canonical(desired)
    return out


def _removals(last: Any, want: Any) -> Any:
    """A merge patch nulling what `last` had and `want` drops, then setting everything `want` has."""
    if not isinstance(want, dict):
        return copy.deepcopy(want)
    patch: dict[str, Any] = {}
    if isinstance(last, dict):
        for k in last:
            if k not in want:
                patch[k] = None
    for k, v in want.items():
        patch[k] = _removals(last.get(k) if isinstance(last, dict) else None, v)
    return patch


@dataclass(frozen=True)
class ApplyPlan:
    action: Literal["create", "patch", "none", "conflict"]
    body: dict[str, Any] | None = None
    reason: str = ""


def controller_uid(obj: dict[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def plan(desired: dict[str, Any], existing: dict[str, Any] | None) -> ApplyPlan:
    """What to send so that `existing` becomes `desired` (see module doc)."""
    body = with_last_applied(desired)
    if existing is None:
        return ApplyPlan("create", body)
    want_uid, have_uid = controller_uid(desired), controller_uid(existing)
    if have_uid is not None and want_uid is not None and have_uid != want_uid:
        kind, name = desired.get("kind"), desired["metadata"]["name"]
        return ApplyPlan("conflict", reason=f"{kind} {name} exists and is controlled by another owner")
    annotations = existing.get("metadata", {}).get("annotations") or {}
    recorded = annotations.get(LAST_APPLIED)
    if recorded == body["metadata"]["annotations"][LAST_APPLIED] and is_subset(desired, existing):
        return ApplyPlan("none")
    try:
        last = json.loads(recorded) if recorded else {}
    except ValueError:
        last = {}
    return ApplyPlan("patch", _removals(last, body))
