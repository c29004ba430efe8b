"""A real S3-compatible HTTP server on 127.0.0.1 for tests: moto's server mode in a child process.

The server runs in its own process (not a thread of the test process), so job subprocesses and Ray
workers reach it over HTTP exactly as they would reach MinIO or AWS, and the GIL of the test process
never slows it down. It stops when the context exits, and also when the parent dies (it waits on its
stdin, which closes with the parent).

Example:
    >>> with start_s3_server(bucket="data") as s3:                         # doctest: +SKIP
    ...     env = {**os.environ, **s3.env}
    ...     subprocess.run([sys.executable, "jobs/prepare_data.py", "synthetic", "s3://data/x"],
    ...                    env=env, check=True)
    ...     s3.keys("x/")
    ['x/dataset.json', 'x/train-00000.parquet', ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Binds port 0 so the OS picks a free port (no race between picking and binding), prints it, then
# serves until stdin reaches EOF. Its log goes to a file: a full pipe would block the server.
#
# moto 5.2 names the root element of its CompleteMultipartUpload reply
# <CompleteMultipartUploadResponse> (getmoto/moto#10055, fixed upstream by #10056); S3, MinIO and
# Ceph send <CompleteMultipartUploadResult>. pyarrow checks that name to detect errors embedded
# in a 200 reply, so every multipart upload (any file over 10 MiB) fails against an unpatched
# moto although the object is complete. The WSGI wrapper below renames the element.
_SERVER_SCRIPT = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

moto_app = DomainDispatcherApplication(create_backend_app)

def app(environ, start_response):
    if environ.get("REQUEST_METHOD") != "POST" or "uploadId=" not in environ.get("QUERY_STRING", ""):
        return moto_app(environ, start_response)
    reply = {}
    def capture(status, headers, exc_info=None):
        reply.update(status=status, headers=headers)
        return lambda data: None
    chunks = moto_app(environ, capture)
    try:
        body = b"".join(chunks)
    finally:
        getattr(chunks, "close", lambda: None)()
    body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
    headers = [(k, v) for k, v in reply["headers"] if k.lower() != "content-length"]
    start_response(reply["status"], headers + [("Content-Length", str(len(body)))])
    return [body]

server = make_server("127.0.0.1", 0, app, threaded=True)
print(server.server_address[1], flush=True)
import threading
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
server.shutdown()
"""


@dataclass
class S3Server:
    """A running moto S3 server and the AWS environment that points at it.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``.
        bucket: the bucket created at start.
        env: variables to add to a process's environment (fake credentials, endpoint, region).
        process: the server's child process.
    """

    endpoint: str
    bucket: str
    env: dict[str, str]
    process: subprocess.Popen = field(repr=False)

    @property
    def secret(self) -> str:
        """The fake secret key, to check it never leaks into output or files."""
        return self.env["AWS_SECRET_ACCESS_KEY"]

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.env["AWS_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, prefix: str = "", markers: bool = False) -> list[str]:
        """Object keys of the bucket under ``prefix``, sorted.

        Args:
            prefix: key prefix.
            markers: include empty ``folder/`` objects, which S3 clients (pyarrow, Ray) create to
                make a prefix look like a directory.
        """
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(k for k in out if markers or not k.endswith("/"))

    def get(self, key: str) -> bytes:
        """The bytes of object ``key``."""
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        """Overwrite object ``key`` with ``data``."""
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)


def s3_env(endpoint: str, secret: str | None = None) -> dict[str, str]:
    """The AWS variables for a local endpoint, isolated from the user's own AWS configuration."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "segray-test-key",
        "AWS_SECRET_ACCESS_KEY": secret or f"segray-test-secret-{uuid.uuid4().hex}",
        "AWS_REGION": "us-east-1",
        # No profile, shared credentials file or instance-metadata lookup may leak in or stall.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextmanager
def start_s3_server(bucket: str = "bucket") -> Iterator[S3Server]:
    """Start moto's S3 server on 127.0.0.1, create ``bucket``, yield it; stop it on exit.

    Args:
        bucket: name of the bucket to create.

    Raises:
        RuntimeError: the server did not start (its output is in the message).
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            port = _read_port(proc, log)
            endpoint = f"http://127.0.0.1:{port}"
            server = S3Server(endpoint, bucket, s3_env(endpoint), proc)
            server.client().create_bucket(Bucket=bucket)
            yield server
        finally:
            _stop(proc)


def _read_port(proc: subprocess.Popen, log: Any) -> int:
    line = proc.stdout.readline()  # blocks until the server prints its port or exits
    if not line.strip().isdigit():
        _stop(proc)
        log.seek(0)
        raise RuntimeError(f"moto S3 server did not start: {line!r} {log.read()[-2000:]}")
    return int(line)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.stdin.close()  # the server's stdin EOF makes it shut down cleanly
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait(timeout=10)
