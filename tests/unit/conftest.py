"""Fixtures of the unit tests."""

from __future__ import annotations

import ast
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


def import_roots(path: Path) -> set[str]:
    """Top-level names of the modules a file imports, to hold a host script to what its hosts
    have; a relative import counts as "." (a script shipped alone has no package beside it)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add("." if node.level else (node.module or "").split(".")[0])
    return roots


@dataclass
class StandIn:
    """A local HTTP server standing in for llama-server's /slots in the host scripts' tests."""

    url: str
    # Bodies to answer GET with, in turn; the last one repeats. Queue them before the first GET.
    bodies: list[bytes] = field(default_factory=list)
    # The Authorization header of every GET (None where it had none).
    auth: list[str | None] = field(default_factory=list)


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    """A stand-in server on 127.0.0.1 (a free port), shut down after the test."""
    server = StandIn("")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            server.auth.append(self.headers.get("Authorization"))
            bodies = server.bodies
            body = bodies.pop(0) if len(bodies) > 1 else bodies[0]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield server
    httpd.shutdown()
    httpd.server_close()
