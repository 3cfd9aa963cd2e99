"""A small async Kubernetes client over aiohttp, fed by kopf's login (same credentials, one connection pool).

Only what the reconciler needs: get, list, create, merge-patch, delete, and API discovery. Dicts in and
out; no generated models, so unknown fields survive and KMock serves it in tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        return base


KINDS: dict[tuple[str, str], Kind] = {
    (k.api_version, k.kind): k
    for k in (
        Kind("apps/v1", "Deployment", "deployments"),
        Kind("v1", "Service", "services"),
        Kind("v1", "ServiceAccount", "serviceaccounts"),
        Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
        Kind("v1", "Pod", "pods"),
        Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
        Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
        Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
        Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
        Kind("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors"),
    )
}


def kind_of(manifest: Mapping[str, Any]) -> Kind:
    return KINDS[(manifest["apiVersion"], manifest["kind"])]


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message or ""


class ConnectionLike(Protocol):
    """The fields of kopf.ConnectionInfo this client reads."""

    server: str
    ca_path: Any
    ca_data: Any
    insecure: bool | None
    username: str | None
    password: str | None
    scheme: str | None
    token: str | None
    certificate_path: Any
    certificate_data: Any
    private_key_path: Any
    private_key_data: Any


def _as_file(data: str | bytes | None, path: Any) -> str | None:
    """kopf gives certificates as paths or base64/PEM data; ssl needs files."""
    if path:
        return os.fsdecode(path)
    if not data:
        return None
    raw = data.encode() if isinstance(data, str) else data
    if not raw.lstrip().startswith(b"-----"):
        raw = base64.b64decode(raw)
    f = tempfile.NamedTemporaryFile(prefix="kubellm-", suffix=".pem", delete=False)  # noqa: SIM115
    f.write(raw)
    f.close()
    return f.name


def _ssl_context(info: ConnectionLike) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ca = _as_file(info.ca_data, info.ca_path)
        ctx = ssl.create_default_context(cafile=ca)
    cert = _as_file(info.certificate_data, info.certificate_path)
    key = _as_file(info.private_key_data, info.private_key_path)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class KubeClient:
    """Async client; `connect()` is called from kopf's login handler, and again when kopf re-logs in."""

    def __init__(self, timeout: float = 30.0) -> None:
        self._info: ConnectionLike | None = None
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._ready = asyncio.Event()

    def connect(self, info: ConnectionLike) -> None:
        self._info = info
        old, self._session = self._session, None
        if old is not None and not old.closed:
            asyncio.get_event_loop().create_task(old.close())
        self._ready.set()

    def _headers(self) -> dict[str, str]:
        assert self._info is not None
        h = {"Accept": "application/json"}
        if self._info.token:
            h["Authorization"] = f"{self._info.scheme or 'Bearer'} {self._info.token}"
        elif self._info.username:
            cred = base64.b64encode(f"{self._info.username}:{self._info.password or ''}".encode()).decode()
            h["Authorization"] = f"Basic {cred}"
        return h

    async def _sess(self) -> aiohttp.ClientSession:
        await self._ready.wait()
        if self._session is None or self._session.closed:
            assert self._info is not None
            conn = aiohttp.TCPConnector(ssl=_ssl_context(self._info), limit=32)
            self._session = aiohttp.ClientSession(connector=conn, timeout=self._timeout, headers=self._headers())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        sess = await self._sess()
        assert self._info is not None
        url = self._info.server.rstrip("/") + path
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else None
        async with sess.request(method, url, data=data, params=params, headers=headers) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            if resp.status >= 400:
                raise ApiError(resp.status, method, path, payload)
            return payload

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", kind.path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, kind: Kind, namespace: str, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Objects carrying all `labels` (filtered here too: some servers and mocks ignore selectors)."""
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        payload = await self.request("GET", kind.path(namespace), params=params)
        items = (payload or {}).get("items") or []
        if labels:
            items = [
                i
                for i in items
                if all((i.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())
            ]
        return items

    async def create(self, kind: Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", kind.path(namespace), body=body)

    async def patch(self, kind: Kind, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "PATCH", kind.path(namespace, name), body=patch, content_type="application/merge-patch+json"
        )

    async def patch_status(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource (where a CRD declares one, the main resource ignores status)."""
        return await self.request(
            "PATCH",
            kind.path(namespace, name) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def delete(self, kind: Kind, namespace: str, name: str) -> None:
        try:
            await self.request("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"})
        except ApiError as e:
            if e.status != 404:
                raise

    async def serves(self, kind: Kind) -> bool:
        """Whether the API server knows this kind (e.g. the ServiceMonitor CRD is installed)."""
        base = f"/apis/{kind.api_version}" if "/" in kind.api_version else f"/api/{kind.api_version}"
        try:
            payload = await self.request("GET", base)
        except ApiError as e:
            if e.status in (404, 503):
                return False
            raise
        return any(r.get("name") == kind.plural for r in (payload or {}).get("resources") or [])
