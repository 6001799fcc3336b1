"""Mirrors the test hosts fetch from: a git repository of llama.cpp and models, over HTTP."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Fixed identity and dates make the mirror commit's sha the same on every machine and run.
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "gemma4-fleet mirror",
    "GIT_AUTHOR_EMAIL": "mirror@gemma4-fleet.invalid",
    "GIT_AUTHOR_DATE": "2026-10-01T00:00:00Z",
    "GIT_COMMITTER_NAME": "gemma4-fleet mirror",
    "GIT_COMMITTER_EMAIL": "mirror@gemma4-fleet.invalid",
    "GIT_COMMITTER_DATE": "2026-10-01T00:00:00Z",
}


def _git(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return result.stdout.strip()


def git_mirror(source: Path, dest: Path, upstream_commit: str) -> tuple[Path, str]:
    """A bare repo holding `source` as one deterministic commit; returns (repo, commit sha).

    Served over "dumb" HTTP, so `update-server-info` keeps the ref listing current.
    """
    repo = dest / "llama.cpp.git"
    if (repo / "g4f-commit").exists():
        return repo, (repo / "g4f-commit").read_text().strip()
    tmp = dest / "llama.cpp.git.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    _git("init", "-q", "--bare", "-b", "master", str(tmp))
    env = {**_GIT_ENV, "GIT_DIR": str(tmp), "GIT_WORK_TREE": str(source)}
    _git("add", "-A", "-f", ".", env=env)
    message = f"llama.cpp {upstream_commit} (vendored in llama-cpp-python 0.3.36)"
    _git("commit", "-q", "-m", message, env=env)
    sha = _git("rev-parse", "HEAD", env=env)
    _git("--git-dir", str(tmp), "gc", "-q")
    _git("--git-dir", str(tmp), "update-server-info")
    (tmp / "g4f-commit").write_text(sha + "\n")
    tmp.rename(repo)
    return repo, sha


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Static files with single `Range: bytes=a-b` support (GGUF header reads use it)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One line per request on stdout (the fleet's mirror.log): who asked for what.

        Tests count the model fetches from it (Fleet.mirror_requests)."""
        headers = getattr(self, "headers", None)  # absent when the request line did not parse
        asked = (headers.get("Range") if headers else None) or "-"
        print(f"{self.client_address[0]} {self.command} {self.path} {asked} {code}", flush=True)

    def send_head(self):  # type: ignore[no-untyped-def]
        header = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not header.startswith("bytes=") or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start_text, _, end_text = header.removeprefix("bytes=").partition("-")
        try:
            start = int(start_text) if start_text else max(size - int(end_text), 0)
            end = min(int(end_text), size - 1) if start_text and end_text else size - 1
        except ValueError:
            self.send_error(HTTPStatus.BAD_REQUEST, "bad Range header")
            return None
        if start >= size or start > end:
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            return None
        fh = path.open("rb")
        fh.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(fh, end - start + 1)


class _Limited:
    """A file object that stops after `left` bytes (copyfile reads until EOF)."""

    def __init__(self, fh, left: int) -> None:  # type: ignore[no-untyped-def]
        self.fh, self.left = fh, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data: bytes = self.fh.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()


def serve(root: Path, bind: str, port: int) -> None:
    """Serve `root` until killed (the fleet starts this as its own process)."""
    handler = partial(RangeRequestHandler, directory=str(root))
    with ThreadingHTTPServer((bind, port), handler) as httpd:
        httpd.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(args.root, args.bind, args.port)


if __name__ == "__main__":
    main()
