"""The init container's real download code against a local server that answers the way the Hub does."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from kubellm.operator import model_download as md

SHA = "0123456789abcdef0123456789abcdef01234567"
FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model.safetensors": b"\x00" * 4096,
    "original/consolidated.pth": b"\x01" * 100,  # ignored: a format the engine does not read
}


class FakeHub:
    """/api/models/{repo}/revision/{rev} and /{repo}/resolve/{rev}/{file}, with the Hub's error headers."""

    def __init__(self) -> None:
        self.repos = {"org/tiny": FILES}
        self.gated = {"org/gated"}
        self.private = {"org/private": "good-token"}
        self.requests: list[str] = []

    def _check(self, request: web.Request, repo: str) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if repo in self.gated:
            return web.Response(status=403, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        if repo in self.private:
            if not auth:
                return web.Response(status=401, headers={"X-Error-Code": "RepoNotFound"})
            if auth != f"Bearer {self.private[repo]}":
                return web.Response(
                    status=401, headers={"X-Error-Message": "Invalid credentials in Authorization header"}
                )
            return None
        if repo not in self.repos:
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound"})
        return None

    async def info(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        self.requests.append(f"info {repo}")
        err = self._check(request, repo)
        if err is not None:
            return err
        if request.match_info["rev"] not in ("main", SHA):
            return web.Response(status=404, headers={"X-Error-Code": "RevisionNotFound"})
        files = self.repos.get(repo, FILES)
        return web.json_response({"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in files]})

    async def tree(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        self.requests.append(f"tree {repo}")
        err = self._check(request, repo)
        if err is not None:
            return err
        files = self.repos.get(repo, FILES)
        entries = [
            {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for f, d in files.items()
        ]
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        path = request.match_info["path"]
        self.requests.append(f"{request.method} {repo} {path}")
        err = self._check(request, repo)
        if err is not None:
            return err
        data = self.repos.get(repo, FILES).get(path)
        if data is None:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {
            "X-Repo-Commit": SHA,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Length": str(len(data)),
        }
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        return web.Response(body=data, headers={k: v for k, v in headers.items() if k != "Content-Length"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub() -> Iterator[tuple[FakeHub, str]]:
    import asyncio

    fake = FakeHub()
    app = web.Application()
    app.router.add_get("/api/models/{org}/{name}/revision/{rev}", fake.info)
    app.router.add_get("/api/models/{org}/{name}/tree/{rev}", fake.tree)
    app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", fake.resolve)
    port = _free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_downloads_files_skips_ignored_and_writes_marker(hub, tmp_path):
    fake, url = hub
    dest = tmp_path / "m"
    md.download("org/tiny", "main", dest, endpoint=url, progress_interval=0.05)
    assert (dest / "config.json").read_bytes() == FILES["config.json"]
    assert (dest / "model.safetensors").stat().st_size == 4096
    assert not (dest / "original").exists()
    assert SHA in (dest / md.MARKER).read_text()
    # a restart (or a second replica on the shared cache) does not touch the hub
    before = len(fake.requests)
    md.download("org/tiny", "main", dest, endpoint=url)
    assert len(fake.requests) == before


@pytest.mark.parametrize(
    ("repo", "revision", "token", "code", "words"),
    [
        ("org/gated", "main", "x", md.EXIT_GATED, "gated"),
        ("org/missing", "main", None, md.EXIT_NOT_FOUND, "not found"),
        ("org/tiny", "v9", None, md.EXIT_NOT_FOUND, "revision 'v9'"),
        ("org/private", "main", "bad-token", md.EXIT_UNAUTHORIZED, "rejected the token"),
    ],
)
def test_failures_exit_with_distinct_codes_and_clear_messages(hub, tmp_path, repo, revision, token, code, words):
    _, url = hub
    with pytest.raises(md.DownloadError) as e:
        md.download(repo, revision, tmp_path / "m", endpoint=url, token=token)
    assert e.value.code == code
    assert words in e.value.message


def test_private_repo_with_the_right_token(hub, tmp_path):
    _, url = hub
    md.download("org/private", "main", tmp_path / "m", endpoint=url, token="good-token")
    assert (tmp_path / "m" / "config.json").exists()


def test_no_space_is_reported_before_downloading(hub, tmp_path, monkeypatch):
    _, url = hub
    monkeypatch.setattr(md.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(md.DownloadError) as e:
        md.download("org/tiny", "main", tmp_path / "m", endpoint=url)
    assert e.value.code == md.EXIT_NO_SPACE
    assert "free" in e.value.message


def test_cli_honours_hf_endpoint_and_token_and_writes_termination_log(hub, tmp_path):
    _, url = hub
    term = tmp_path / "termination-log"
    env = {"PATH": "/usr/bin:/bin", "HF_ENDPOINT": url, "HF_TOKEN": "bad-token", "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "kubellm.operator.model_download", "--repo", "org/private", "--dest"]
    out = subprocess.run(
        [*cmd, str(tmp_path / "m"), "--termination-log", str(term)], env=env, capture_output=True, text=True
    )
    assert out.returncode == md.EXIT_UNAUTHORIZED, out.stdout + out.stderr
    assert "rejected the token" in term.read_text()
    env["HF_TOKEN"] = "good-token"
    out = subprocess.run([*cmd, str(tmp_path / "m2")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "downloaded to" in out.stdout
    assert Path(tmp_path / "m2" / "model.safetensors").exists()
