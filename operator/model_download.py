"""Init container of engine pods: download a Hugging Face model into the model cache, once.

    python -m kubellm.operator.model_download --repo ORG/NAME --revision REV --dest DIR

Honours HF_ENDPOINT (mirrors, air-gapped hubs) and HF_TOKEN (from the Secret in spec.model.tokenSecretRef).
A completed download leaves a marker, so restarts and new replicas sharing the cache skip the hub.
Failures exit with a distinct code and a one-line message, written to the termination log too, which
the operator turns into a Degraded condition (ModelGated, ModelUnauthorized, ModelNotFound, NoSpaceForModel).

Imports nothing of kopf or the operator: it runs in the engine image.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_GATED = 10
EXIT_UNAUTHORIZED = 11
EXIT_NOT_FOUND = 12
EXIT_NO_SPACE = 13

MARKER = ".kubellm-download-complete"
TERMINATION_LOG = "/dev/termination-log"
# Formats the engine does not read; skipping them avoids doubling download size for many repos.
DEFAULT_IGNORE = ["original/*", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.pth", "*.pt"]

log = logging.getLogger("kubellm.model_download")


class DownloadError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class _Progress(threading.Thread):
    """Logs bytes on disk and rate every `interval` s: pod logs have no TTY for progress bars."""

    def __init__(self, dest: Path, total: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.dest, self.total, self.interval = dest, total, interval
        self.stop = threading.Event()

    def run(self) -> None:
        start, last = time.monotonic(), 0
        while not self.stop.wait(self.interval):
            now = _dir_bytes(self.dest)
            elapsed = time.monotonic() - start
            pct = f" ({100 * now / self.total:.0f}%)" if self.total else ""
            rate = (now - last) / self.interval
            log.info(
                "downloaded %s of %s%s, %.1f MiB/s, %.0fs", _gib(now), _gib(self.total), pct, rate / 2**20, elapsed
            )
            last = now


def _classify(exc: BaseException, repo: str, revision: str, endpoint: str, has_token: bool) -> DownloadError:
    """Map huggingface_hub's exceptions to an exit code and a message a user can act on."""
    from huggingface_hub import errors as hf

    # huggingface_hub wraps the HTTP error (e.g. in DryRunError); the root cause says what went wrong
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    known = (hf.GatedRepoError, hf.RevisionNotFoundError, hf.RepositoryNotFoundError, hf.HfHubHTTPError, OSError)
    exc = next((e for e in chain if isinstance(e, known) and not isinstance(e, hf.DryRunError)), exc)

    if isinstance(exc, hf.GatedRepoError):
        return DownloadError(
            EXIT_GATED,
            f"model {repo} is gated: accept its license on {endpoint}/{repo} with the account whose token is in "
            f"the Secret named by spec.model.tokenSecretRef" + ("" if has_token else " (no token is set)"),
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return DownloadError(EXIT_NOT_FOUND, f"revision {revision!r} of model {repo} not found on {endpoint}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        hint = "or the token cannot see it" if has_token else "or it is private/gated and no token is set"
        return DownloadError(EXIT_NOT_FOUND, f"model {repo} not found on {endpoint} ({hint})")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return DownloadError(
                EXIT_UNAUTHORIZED,
                f"{endpoint} rejected the token for {repo} (HTTP {status}): check the Secret in "
                "spec.model.tokenSecretRef",
            )
        return DownloadError(EXIT_FAILED, f"download of {repo} failed: HTTP {status}: {str(exc).splitlines()[0]}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DownloadError(EXIT_NO_SPACE, f"no space left on the model cache while downloading {repo}: {exc}")
    return DownloadError(EXIT_FAILED, f"download of {repo} from {endpoint} failed: {type(exc).__name__}: {exc}")


def download(
    repo: str,
    revision: str,
    dest: Path,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    ignore_patterns: list[str] | None = None,
    progress_interval: float = 10.0,
) -> Path:
    """Download `repo`@`revision` into `dest`; raises DownloadError with an exit code on failure."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - the engine image installs it
        raise DownloadError(EXIT_FAILED, "huggingface_hub is not installed in this image") from e

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    marker = dest / MARKER
    if marker.is_file():
        log.info(
            "model %s@%s already in the cache at %s (%s); skipping download", repo, revision, dest, marker.read_text()
        )
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    ignore = DEFAULT_IGNORE if ignore_patterns is None else ignore_patterns
    common = {
        "repo_id": repo,
        "revision": revision,
        "local_dir": dest,
        "endpoint": endpoint,
        "token": token or False,
        "ignore_patterns": ignore,
    }
    try:
        plan = snapshot_download(**common, dry_run=True)
        needed = sum((f.file_size or 0) for f in plan if f.will_download)
        free = shutil.disk_usage(dest).free
        log.info(
            "model %s@%s from %s: %d files, %s to download, %s free at %s",
            repo, revision, endpoint, len(plan), _gib(needed), _gib(free), dest,
        )  # fmt: skip
        if needed > free:
            raise DownloadError(
                EXIT_NO_SPACE,
                f"model {repo} needs {_gib(needed)} but the model cache at {dest} has {_gib(free)} free: "
                "raise spec.modelCache.size or use a larger claim",
            )
        progress = _Progress(dest, needed, progress_interval)
        progress.start()
        try:
            snapshot_download(**common)
        finally:
            progress.stop.set()
        commit = plan[0].commit_hash if plan else revision
    except DownloadError:
        raise
    except Exception as e:
        raise _classify(e, repo, revision, endpoint, bool(token)) from e
    marker.write_text(f"{repo}@{commit}\n")
    log.info("model %s@%s downloaded to %s (%s on disk)", repo, commit, dest, _gib(_dir_bytes(dest)))
    return dest


def _write_termination_log(path: str, message: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(message[:4000])
    except OSError:
        pass  # outside Kubernetes there is no termination log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubellm.operator.model_download",
        description="Download a Hugging Face model into the kubellm model cache (engine pods' init container).",
    )
    p.add_argument("--repo", required=True, help="Hugging Face id, e.g. meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.add_argument("--dest", required=True, type=Path, help="directory to download into")
    p.add_argument("--endpoint", default=None, help="hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding the token")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--termination-log", default=TERMINATION_LOG, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    token = os.environ.get(args.token_env) or None
    try:
        download(
            args.repo,
            args.revision,
            args.dest,
            endpoint=args.endpoint,
            token=token,
            progress_interval=args.progress_interval,
        )
    except DownloadError as e:
        log.error("%s", e.message)
        _write_termination_log(args.termination_log, e.message)
        return e.code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
