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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Binds port 0 so the OS picks a free port (no race between picking and binding), prints it, then
# serves until stdin reaches EOF.
_SERVER_SCRIPT = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
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

    def keys(self, prefix: str = "") -> list[str]:
        """All object keys of the bucket under ``prefix``, sorted."""
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(out)

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
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = _read_port(proc)
        endpoint = f"http://127.0.0.1:{port}"
        server = S3Server(endpoint, bucket, s3_env(endpoint), proc)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        _stop(proc)


def _read_port(proc: subprocess.Popen) -> int:
    line = proc.stdout.readline()  # blocks until the server prints its port or exits
    if not line.strip().isdigit():
        _stop(proc)
        raise RuntimeError(f"moto S3 server did not start: {line!r} {proc.stderr.read()[-2000:]}")
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
