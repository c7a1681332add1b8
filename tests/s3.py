"""A real S3 server for the tests (moto over HTTP on loopback, docs/design.md §3 / docs/design.md §11 "real components"), a
fault-injecting proxy in front of it, and helpers that reach around the store to inspect or damage what it
wrote. The fixtures are registered for every test directory by tests/conftest.py."""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from moto.server import ThreadedMotoServer

# Distinctive fake credentials: tests assert they never appear in anything the store writes.
FAKE_KEY_ID = "AKIAMANYTESTKEY4242"
FAKE_SECRET = "many-fake-secret-never-store-me"
REGION = "eu-west-3"
STALL_SECONDS = 1.0  # a stalled request of FaultyS3.fail_randomly: slow, well under the store's read timeout


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random port); the AWS environment points every client at it."""
    no_files = tmp_path_factory.mktemp("aws") / "absent"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": REGION,  # a region_name argument would break bucket creation on moto
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(no_files),  # never read the machine's real AWS config
        "AWS_SHARED_CREDENTIALS_FILE": str(no_files),
    }
    saved = {name: os.environ.get(name) for name in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def new_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server."""
    bucket = f"many-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    return bucket


# -- reaching around the store to inspect or damage what it wrote (test helpers, imported by the tests) --


def stored_objects(store_url: str) -> dict[str, bytes]:
    """Every object under the store root, by store-relative path."""
    if store_url.startswith("file://"):
        root = Path(store_url.removeprefix("file://"))
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    bucket, _, prefix = store_url.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"].removeprefix(prefix + "/"): s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def overwrite(store_url: str, rel: str, data: bytes) -> None:
    """Replace a stored object's bytes behind the store's back (bit rot on disk, a bad re-put on S3)."""
    if store_url.startswith("file://"):
        target = Path(store_url.removeprefix("file://"), rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    else:
        bucket, _, prefix = store_url.removeprefix("s3://").partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


def blob_rel(digest: str) -> str:
    return f"blobs/sha256/{digest[:2]}/{digest[2:]}"


class FaultyS3:
    """An HTTP proxy in front of moto that answers the next `n` requests with an injected S3 error
    (503 SlowDown-style outage, or 403 AccessDenied) and forwards everything else; counts requests.

    `fail_randomly` instead injects a fault into a fraction of all requests: a 500/503, a connection reset
    before forwarding, a "lost answer" (forwarded to S3, then the connection reset: the write happened but
    the client never hears so), or a stall; `injected` counts them by kind."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.requests = 0
        self.injected: Counter[str] = Counter()
        self._faults: list[tuple[int, str]] = []
        self._random: tuple[float, tuple[str, ...], random.Random] | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail_next(self, n: int, status: int, code: str) -> None:
        with self._lock:
            self._faults = [(status, code)] * n

    def fail_randomly(self, fraction: float, kinds: tuple[str, ...] = ("500", "503", "reset", "lost", "stall"), seed: int = 0) -> None:
        with self._lock:
            self._random = (fraction, kinds, random.Random(seed)) if fraction > 0 else None

    def _draw(self) -> tuple[int, str] | str | None:
        if self._faults:
            return self._faults.pop(0)
        if self._random is None:
            return None
        fraction, kinds, rng = self._random
        if rng.random() >= fraction:
            return None
        kind = rng.choice(kinds)
        self.injected[kind] += 1
        return (int(kind), "InternalError" if kind == "500" else "SlowDown") if kind.isdigit() else kind

    def faults_left(self) -> int:
        with self._lock:
            return len(self._faults)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's `Expect: 100-continue` before reading a body

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    fault = proxy._draw()
                if fault == "stall":
                    time.sleep(STALL_SECONDS)
                elif fault == "reset":
                    return self.reset()
                if isinstance(fault, tuple):
                    error = f"<Error><Code>{fault[1]}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(fault[0])
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                if fault == "lost":
                    return self.reset()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "server", "date", "content-length"):
                        self.send_header(name, value)
                head_length = response.getheader("Content-Length", "0")
                self.send_header("Content-Length", head_length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def reset(self) -> None:
                """Drop the connection with a TCP RST, as a crashed load balancer would."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        return Handler


@pytest.fixture
def faulty_s3(s3_endpoint: str) -> Iterator[FaultyS3]:
    proxy = FaultyS3(s3_endpoint)
    yield proxy
    proxy.close()
