"""A stand-in for the Hugging Face hub API (a cloud service this machine cannot reach), named as such: a real HTTP
server on 127.0.0.1 that answers like the hub does for an unknown repository (404 RepoNotFound) and for a gated one
requested without a token (401 GatedRepo). Point huggingface_hub at it with HF_ENDPOINT."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Hub(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        gated = "/gated-org/" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to this model is restricted." if gated else "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"{}")

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


class FakeHub:
    """`with FakeHub() as url:` serves until the block ends."""

    def __enter__(self) -> str:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
