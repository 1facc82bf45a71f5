"""A real S3-compatible server for the cluster tests: moto's server (the one `moto_server` runs), plus the one thing
real S3 has and moto lacks, durability across a restart.

    python tests/s3_server.py --port P --state DIR

SIGTERM stops serving, then saves every bucket and object under DIR and exits; a start with the same DIR serves them
again from its first request. A SIGKILL loses whatever was not saved (moto keeps everything in memory).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import socket
import threading
from pathlib import Path

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server


def client(port: int):  # noqa: ANN201 (boto3 client types are generated)
    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="state",
        aws_secret_access_key="state",
        region_name="us-east-1",
    )


def restore(port: int, state: Path) -> int:
    index = state / "index.json"
    if not index.is_file():
        return 0
    s3 = client(port)
    entries = json.loads(index.read_text())
    for bucket in entries["buckets"]:
        s3.create_bucket(Bucket=bucket)
    for i, (bucket, key) in enumerate(entries["objects"]):
        s3.put_object(Bucket=bucket, Key=key, Body=(state / "objects" / str(i)).read_bytes())
    return len(entries["objects"])


def save(port: int, state: Path) -> int:
    s3 = client(port)
    (state / "objects").mkdir(parents=True, exist_ok=True)
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    objects = []
    for bucket in buckets:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                (state / "objects" / str(len(objects))).write_bytes(
                    s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                )
                objects.append((bucket, obj["Key"]))
    tmp = state / "index.json.tmp"
    tmp.write_text(json.dumps({"buckets": buckets, "objects": objects}))
    tmp.replace(state / "index.json")
    return len(objects)


class Handler(MotoRequestHandler):
    """moto's handler, keeping a set of the connections it is serving, so that a stop can cut them."""

    open: set[socket.socket] = set()

    def setup(self) -> None:
        super().setup()
        Handler.open.add(self.connection)

    def finish(self) -> None:
        Handler.open.discard(self.connection)
        super().finish()


def serve(port: int, handler: type = MotoRequestHandler) -> BaseWSGIServer:
    """moto's WSGI app on 127.0.0.1:port, served from a thread (binding fails here, at once, if the port is taken)."""
    server = make_server(
        "127.0.0.1", port, DomainDispatcherApplication(create_backend_app), True, request_handler=handler
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def cut(server: BaseWSGIServer) -> None:
    """Stop accepting, cut every open connection (a client may hold one idle, or stall mid-request: its handler would
    wait for it forever), then wait for every handler to return: after this, nothing writes to the backend."""
    server.shutdown()
    for conn in list(Handler.open):
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed meanwhile
            pass
    server.server_close()  # joins the handler threads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state", type=Path, required=True)
    args = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # A second server on a private port shares moto's in-memory backend: state goes in and out through it, so the
    # public port serves the restored objects from its first request and takes no writes while they are saved.
    private = serve(0)
    restored = restore(private.port, args.state)
    public = serve(args.port, Handler)
    print(f"serving on 127.0.0.1:{args.port} ({restored} objects restored)", flush=True)
    stop.wait()
    faulthandler.dump_traceback_later(60, exit=False)  # a stop that hangs shows where, in the log
    cut(public)
    saved = save(private.port, args.state)
    private.shutdown()
    print(f"stopped; {saved} objects saved", flush=True)


if __name__ == "__main__":
    main()
