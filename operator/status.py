"""Status of an LLMDeployment from what its children report: pure functions over observed objects.

Conditions follow Kubernetes conventions (type, status, reason, message, lastTransitionTime that moves
only when status flips). Failures of pods are read from container states and termination messages
(engine and download containers use FallbackToLogsOnError), so "gated model" or "unsupported
architecture" reaches `kubectl get llmd` instead of staying buried in a pod log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kubellm.operator import model_download as md

CONDITION_TYPES = ("Ready", "EnginesAvailable", "RouterAvailable", "Progressing", "Degraded")

DOWNLOAD_REASONS = {
    md.EXIT_GATED: "ModelGated",
    md.EXIT_UNAUTHORIZED: "ModelUnauthorized",
    md.EXIT_NOT_FOUND: "ModelNotFound",
    md.EXIT_NO_SPACE: "NoSpaceForModel",
}
_UNSUPPORTED = re.compile(r"unsupported (model )?architecture|architecture .* (is )?not supported", re.I)
_WAITING_FAILURES = {
    "ImagePullBackOff": "ImagePullFailed",
    "ErrImagePull": "ImagePullFailed",
    "InvalidImageName": "ImagePullFailed",
    "CreateContainerConfigError": "ContainerConfigError",
}


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str


def _terminated_failure(status: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("state", "lastState"):
        term = (status.get(key) or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0:
            return term
    return None


def _tail(message: str, limit: int = 400) -> str:
    message = " ".join(message.strip().split())
    return message if len(message) <= limit else "…" + message[-limit:]


def pod_failure(pod: dict[str, Any]) -> Failure | None:
    """Why this pod cannot serve, when it says so; None for healthy or merely starting pods."""
    status = pod.get("status") or {}
    name = pod.get("metadata", {}).get("name", "?")
    for cs in status.get("initContainerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _WAITING_FAILURES:
            return Failure(_WAITING_FAILURES[waiting["reason"]], f"pod {name}: {waiting.get('message', '')}".strip())
        term = _terminated_failure(cs)
        if term is None or (cs.get("state") or {}).get("terminated", {}).get("exitCode") == 0:
            continue
        code = term.get("exitCode")
        reason = "InitFailed"
        if cs.get("name") == "model-download":  # its exit codes name the cause; any other is a plain failure
            known = DOWNLOAD_REASONS.get(code) if isinstance(code, int) else None
            reason = known or "ModelDownloadFailed"
        text = term.get("message") or term.get("reason") or f"exit code {code}"
        return Failure(reason, f"pod {name} {cs.get('name')}: {_tail(text)}")
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _WAITING_FAILURES:
            return Failure(_WAITING_FAILURES[waiting["reason"]], f"pod {name}: {waiting.get('message', '')}".strip())
        term = _terminated_failure(cs)
        if term is None or cs.get("ready"):
            continue
        text = term.get("message") or term.get("reason") or f"exit code {term.get('exitCode')}"
        reason = "UnsupportedArchitecture" if _UNSUPPORTED.search(text) else "EngineFailed"
        return Failure(reason, f"pod {name} {cs.get('name')}: {_tail(text)}")
    return None


def unschedulable(pod: dict[str, Any]) -> str | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return cond.get("message") or "no node fits the pod"
    return None


def pod_ready(pod: dict[str, Any]) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


@dataclass(frozen=True)
class Observed:
    """What the reconciler read this round."""

    generation: int
    desired_replicas: int
    engine: dict[str, Any] | None  # engine Deployment
    router: dict[str, Any] | None  # router Deployment
    engine_pods: tuple[dict[str, Any], ...] = ()
    endpoint: str = ""
    selector: str = ""
    model: str = ""
    spec_error: str | None = None
    apply_error: str | None = None
    last_scale_time: str | None = None
    last_scale_reason: str | None = None


def _cond(type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}


def _dep_status(dep: dict[str, Any] | None) -> dict[str, Any]:
    return (dep or {}).get("status") or {}


def _rolled_out(dep: dict[str, Any] | None, desired: int) -> bool:
    if dep is None:
        return False
    st = _dep_status(dep)
    meta_gen = dep.get("metadata", {}).get("generation")
    if meta_gen is not None and st.get("observedGeneration", meta_gen) < meta_gen:
        return False
    return (
        st.get("updatedReplicas", 0) >= desired
        and st.get("readyReplicas", 0) >= desired
        and (st.get("replicas", 0) <= desired)
    )


def compute_conditions(o: Observed) -> tuple[str, list[dict[str, Any]], int, int]:
    """(phase, conditions, replicas, readyReplicas) for what was observed."""
    eng = _dep_status(o.engine)
    replicas = int(eng.get("replicas", 0) or 0)
    ready = int(eng.get("readyReplicas", 0) or 0)
    router_ready = int(_dep_status(o.router).get("readyReplicas", 0) or 0)
    failures = [f for f in (pod_failure(p) for p in o.engine_pods) if f is not None]
    pending = [m for m in (unschedulable(p) for p in o.engine_pods) if m]

    if o.spec_error is not None:
        degraded = _cond("Degraded", True, "InvalidSpec", o.spec_error)
    elif o.apply_error is not None:
        degraded = _cond("Degraded", True, "ApplyFailed", o.apply_error)
    elif failures:
        degraded = _cond("Degraded", True, failures[0].reason, failures[0].message)
    else:
        degraded = _cond("Degraded", False, "AsExpected", "no failures observed")

    if o.desired_replicas == 0:
        engines = _cond("EnginesAvailable", False, "ScaledToZero", "no engine replicas; the router holds requests")
    elif ready > 0:
        engines = _cond(
            "EnginesAvailable", True, "ReplicasReady", f"{ready}/{o.desired_replicas} engine replicas ready"
        )
    else:
        engines = _cond("EnginesAvailable", False, "NoReplicaReady", f"0/{o.desired_replicas} engine replicas ready")

    if router_ready > 0:
        router = _cond("RouterAvailable", True, "ReplicasReady", f"{router_ready} router replicas ready")
    else:
        router = _cond("RouterAvailable", False, "NoReplicaReady", "no router replica ready")

    if o.spec_error is not None:
        progressing = _cond("Progressing", False, "InvalidSpec", "fix the spec to continue")
    elif _rolled_out(o.engine, o.desired_replicas) and _rolled_out(o.router, int(_desired(o.router))):
        progressing = _cond("Progressing", False, "RolledOut", "all replicas are up to date and ready")
    elif pending:
        progressing = _cond("Progressing", True, "Unschedulable", pending[0])
    else:
        progressing = _cond(
            "Progressing", True, "RollingOut", f"engine replicas {ready}/{o.desired_replicas} ready, rollout under way"
        )

    is_degraded = degraded["status"] == "True"
    serving = router["status"] == "True" and (ready > 0 or o.desired_replicas == 0)
    if is_degraded and not (serving and ready > 0):
        ready_cond = _cond("Ready", False, degraded["reason"], degraded["message"])
    elif serving:
        reason = "ScaledToZero" if o.desired_replicas == 0 else "Serving"
        ready_cond = _cond("Ready", True, reason, f"serving at {o.endpoint}")
    else:
        ready_cond = _cond("Ready", False, "NotReady", "waiting for engines and router to become ready")

    if is_degraded:
        phase = "Degraded"
    elif ready_cond["status"] == "True":
        phase = "ScaledToZero" if o.desired_replicas == 0 else "Ready"
    elif o.engine is None:
        phase = "Pending"
    else:
        phase = "Progressing"
    return phase, [ready_cond, engines, router, progressing, degraded], replicas, ready


def _desired(dep: dict[str, Any] | None) -> int:
    return int(((dep or {}).get("spec") or {}).get("replicas", 1) or 0)


def merge_conditions(
    old: list[dict[str, Any]] | None, new: list[dict[str, Any]], now: str, generation: int
) -> list[dict[str, Any]]:
    """Stamp lastTransitionTime only where the status flipped; keep the old time otherwise."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = previous.get(c["type"])
        stamped = dict(c, observedGeneration=generation)
        unchanged = prev is not None and prev.get("status") == c["status"]
        stamped["lastTransitionTime"] = prev.get("lastTransitionTime", now) if prev is not None and unchanged else now
        out.append(stamped)
    return out


def build_status(o: Observed, old_status: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """The whole operator-owned status for this round (kopf's own keys are not touched)."""
    phase, conditions, replicas, ready = compute_conditions(o)
    old_status = old_status or {}
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": merge_conditions(old_status.get("conditions"), conditions, now, o.generation),
        "replicas": replicas,
        "desiredReplicas": o.desired_replicas,
        "readyReplicas": ready,
        "selector": o.selector,
        "endpoint": o.endpoint,
        "model": o.model,
        "observedGeneration": o.generation,
    }
    if o.last_scale_time:
        status["lastScaleTime"] = o.last_scale_time
        status["lastScaleReason"] = o.last_scale_reason or ""
    elif old_status.get("lastScaleTime"):
        status["lastScaleTime"] = old_status["lastScaleTime"]
        status["lastScaleReason"] = old_status.get("lastScaleReason", "")
    return status


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    old = old or {}
    return any(old.get(k) != v for k, v in new.items())


def condition(status: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None
