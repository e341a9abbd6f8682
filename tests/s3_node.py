"""A FLAME node's data path, for tests: a real S3 server behind a stand-in of the node's gateway.

On a node, an analysis reaches its S3 data through nginx and Kong
(``http://nginx-<deployment>/kong/<source>/s3[/<key>]``, header ``apikey``), and
Kong's minio-gateway plugin signs each request and forwards it, path and query,
to the bucket (PrivateAIM/kong-plugin-minio-gateway). Here the S3 server is moto
in server mode (a real S3 implementation over HTTP, from PyPI), and
:class:`Gateway` is the thin route mapping in front of it, on localhost: it
checks the apikey, forwards ``/kong/<source>/s3...`` to ``/<bucket>...`` with the
query, streams the answer back, and serves the hub adapter's
``/hub-adapter/kong/datastore/<project>`` (the data sources flamesdk lists). It
can fail GETs on purpose: some tries of some keys (HTTP 503, or a body cut
short), every try of others, and it counts tries and the object GETs in flight.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

APIKEY = "test-data-source-token"
CREDENTIALS = ("test-access-key", "test-secret-key")  # the S3 server's, which only Kong knows
PROJECT = "project-1"


@dataclass
class Faults:
    """What the gateway does wrong, by object key."""

    transient: dict[str, int] = field(default_factory=dict)  # key -> first tries that fail
    cut_short: set[str] = field(default_factory=set)  # their failing tries send half a body
    permanent: set[str] = field(default_factory=set)  # every try: HTTP 500
    listing_down: bool = False  # every listing: HTTP 502


class Gateway:
    """The node's nginx + Kong routes, in front of an S3 server (see the module docstring)."""

    def __init__(self, s3: tuple[str, int], buckets: Mapping[str, str]) -> None:
        self.s3 = s3
        self.buckets = dict(buckets)  # data source name -> bucket
        self.faults = Faults()
        self.tries: Counter[str] = Counter()  # key -> GETs received
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                gateway.handle(self)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/kong"

    @property
    def nginx_name(self) -> str:
        """What flamesdk's ``DataApiClient`` takes as ``nginx_name`` (``host:port``)."""
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def sources(self) -> list[dict[str, Any]]:
        """The hub adapter's answer for the project: one entry per data source."""
        return [{"id": f"id-{name}", "name": name, "paths": [f"/{PROJECT}-{name}"]} for name in self.buckets]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urlsplit(request.path)
        if url.path == f"/hub-adapter/kong/datastore/{PROJECT}":
            return _answer(request, 200, json.dumps({"data": self.sources()}).encode(), "application/json")
        if request.headers.get("apikey") != APIKEY:
            return _answer(request, 401, b'{"message":"No API key found in request"}', "application/json")
        parts = url.path.split("/", 4)  # "", "kong", source, "s3", key
        source = unquote(parts[2]) if len(parts) > 2 else ""
        if len(parts) < 4 or parts[1] != "kong" or parts[3] != "s3" or source not in self.buckets:
            return _answer(request, 404, b"no route", "text/plain")
        bucket = self.buckets[source]
        if len(parts) == 4 or not parts[4]:  # the listing
            if self.faults.listing_down:
                return _answer(request, 502, b"bad gateway", "text/plain")
            return self._forward(request, f"/{bucket}" + (f"?{url.query}" if url.query else ""), None)
        key = unquote(parts[4])
        with self._lock:
            self.tries[key] += 1
            tries = self.tries[key]
        if key in self.faults.permanent:
            return _answer(request, 500, b"internal error", "text/plain")
        failing = tries <= self.faults.transient.get(key, 0)
        if failing and key not in self.faults.cut_short:
            return _answer(request, 503, b"slow down", "text/plain")
        self._forward(request, f"/{bucket}/{parts[4]}", key, cut=failing)

    def _signed(self, path: str) -> dict[str, str]:
        """AWS Signature V4 headers for a GET of ``path``, as Kong's minio-gateway plugin adds them."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        host, port = self.s3
        request = AWSRequest(method="GET", url=f"http://{host}:{port}{path}")
        S3SigV4Auth(Credentials(*CREDENTIALS), "s3", "us-east-1").add_auth(request)
        return dict(request.headers.items())

    def _forward(
        self, request: BaseHTTPRequestHandler, path: str, key: str | None, cut: bool = False
    ) -> None:
        """Stream the S3 server's answer to ``path`` back; ``cut``: stop halfway and hang up."""
        with self._lock:
            if key is not None:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            upstream = http.client.HTTPConnection(*self.s3, timeout=60)
            upstream.request("GET", path, headers=self._signed(path))
            answer = upstream.getresponse()
            length = int(answer.headers.get("Content-Length", "0"))
            request.send_response(answer.status)
            request.send_header(
                "Content-Type", answer.headers.get("Content-Type", "application/octet-stream")
            )
            request.send_header("Content-Length", str(length))
            request.end_headers()
            sent, stop = 0, length // 2 if cut else length
            while sent < stop:
                chunk = answer.read(min(1 << 20, stop - sent))
                if not chunk:
                    break
                request.wfile.write(chunk)
                sent += len(chunk)
            upstream.close()
            if cut:
                request.close_connection = True
                request.wfile.flush()
                request.connection.shutdown(2)
        finally:
            with self._lock:
                if key is not None:
                    self.in_flight -= 1


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection the gateway cut on purpose, or a client that hung up


def _answer(request: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


@dataclass
class S3Node:
    """A running S3 server with one bucket per data source, and the gateway in front of it."""

    gateway: Gateway
    client: Any  # boto3's S3 client, talking to the S3 server directly

    def put(self, source: str, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.gateway.buckets[source], Key=key, Body=body)


@contextmanager
def s3_node(sources: list[str]) -> Iterator[S3Node]:
    """Start moto's S3 server and the gateway on free localhost ports; stop both at the end."""
    import boto3
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request line, object keys included: not part of what is tested here.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    gateway = None
    try:
        host, port = s3.get_host_and_port()
        client = boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS[0],
            aws_secret_access_key=CREDENTIALS[1],
        )
        _reset(host, port)  # moto's store is one per process: start empty
        buckets = {name: f"bucket-{number}" for number, name in enumerate(sources)}
        for bucket in buckets.values():
            client.create_bucket(Bucket=bucket)
        gateway = Gateway((host, port), buckets)
        gateway.thread.start()
        yield S3Node(gateway, client)
    finally:
        if gateway is not None:
            gateway.server.shutdown()
            gateway.server.server_close()
        _reset(*s3.get_host_and_port())  # and leave nothing behind (moto keeps objects in memory)
        s3.stop()


def _reset(host: str, port: int) -> None:
    """moto's own API call that empties every bucket of its server."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("POST", "/moto-api/reset")
    assert connection.getresponse().status == 200
    connection.close()
