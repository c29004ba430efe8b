"""One writer per run folder: a lease (``run.lock``) taken before a run or sweep writes anything.

Two ``jobs/train.py --name X`` at once (or one ``ray job submit`` sent twice) would interleave
their checkpoints, histories and reports in one folder. The first takes the lease; the second is
refused, naming the holder. The holder renews the lease every ``HEARTBEAT_S`` seconds, and a
lease whose holder is gone is taken over, so a crashed driver never locks its run for good: a
holder on this host whose process has exited is gone at once, any holder whose last heartbeat is
older than ``EXPIRE_S`` seconds is gone then.

The lease is created exclusively: locally by hard-linking a complete file into place (which fails
if one is there), on S3 by a conditional ``PutObject`` (``If-None-Match: *``), and renewed or
taken over with ``If-Match`` on the ETag read (AWS S3 and MinIO honour both; a store that ignores
them gives no exclusion). A lease holds no secret: token, host, process id, times, what holds it.

Example:
    >>> with RunLease("s3://bucket/runs/r1", "jobs/train.py"):   # doctest: +SKIP
    ...     ...  # the run's work; RunInUse if another process holds the lease
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from segray import storage

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
EXPIRE_S = 120.0


class RunInUse(RuntimeError):
    """Another live process holds the folder's lease."""


class RunLease:
    """The lease of the folder ``uri``, held from :meth:`acquire` to :meth:`release` (or as a
    context manager), renewed by a daemon thread meanwhile.

    Args:
        uri: the run or sweep folder (local or ``s3://``).
        holder: what holds it, for the message another process gets (``jobs/train.py``).
        heartbeat_s: seconds between renewals.
        expire_s: age of the last heartbeat past which a lease is taken over.
    """

    def __init__(self, uri: str, holder: str, *, heartbeat_s: float = HEARTBEAT_S,
                 expire_s: float = EXPIRE_S) -> None:
        self.uri = uri
        self.lock_uri = storage.join(uri, LOCK_FILE)
        self.holder = holder
        self.heartbeat_s, self.expire_s = heartbeat_s, expire_s
        self.token = uuid.uuid4().hex
        self.taken_over: dict[str, Any] | None = None  # the stale lease replaced, if any
        self.lost = False  # another process took the lease over while this one held it
        self._backend = _S3Lock(self.lock_uri) if storage.is_s3(uri) else _LocalLock(self.lock_uri)
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        return {"token": self.token, "holder": self.holder, "host": socket.gethostname(),
                "pid": os.getpid(), "started": self._started, "heartbeat": time.time()}

    def acquire(self) -> RunLease:
        """Take the lease and start renewing it.

        Raises:
            RunInUse: a live process holds it (the message names it, and how long until its
                lease would expire).
        """
        for _ in range(5):  # another process may take or drop it between our steps
            if self._backend.create(self.record()):
                break
            current, version = self._backend.read()
            if current is None:
                continue  # released meanwhile
            if not self.stale(current):
                raise RunInUse(self.describe(current))
            if self._backend.replace(self.record(), version):
                self.taken_over = current
                break
        else:
            raise RunInUse(f"{self.lock_uri} changed hands repeatedly while taking it; retry")
        self._thread = threading.Thread(target=self._renew, name="segray-lease", daemon=True)
        self._thread.start()
        return self

    def stale(self, record: dict[str, Any]) -> bool:
        """Whether the holder of ``record`` is gone: its process has exited (on this host), or
        its last heartbeat is older than ``expire_s``."""
        if time.time() - float(record.get("heartbeat", 0)) > self.expire_s:
            return True
        return record.get("host") == socket.gethostname() and not _alive(int(record.get("pid", 0)))

    def describe(self, record: dict[str, Any]) -> str:
        age = max(0.0, time.time() - float(record.get("heartbeat", 0)))
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("started", 0))))
        return (f"{self.uri} is in use by {record.get('holder', 'another process')} on host "
                f"{record.get('host', '?')} (pid {record.get('pid', '?')}, since {since}, last "
                f"heartbeat {age:.0f} s ago); wait for it to end or pick another --name (if that "
                f"process is gone, its lease {self.lock_uri} expires {self.expire_s:.0f} s after "
                "its last heartbeat)")

    def renew(self) -> bool:
        """Renew the lease now; False (and ``lost``) if another process has taken it over."""
        current, version = self._backend.read()
        if current is None or current.get("token") != self.token:
            self.lost = True
            return False
        record = dict(current, heartbeat=time.time())
        if not self._backend.replace(record, version):
            self.lost = True
        return not self.lost

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.renew():
                    print(f"[segray] warning: another process took over {self.lock_uri} (this "
                          "one missed its heartbeats); two processes may now write here",
                          file=sys.stderr, flush=True)
                    return
            except OSError as e:  # storage briefly unreachable: try again at the next beat
                print(f"[segray] warning: cannot renew {self.lock_uri}: {e}", file=sys.stderr,
                      flush=True)

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current, version = self._backend.read()
        if current is not None and current.get("token") == self.token:
            self._backend.delete(version)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class _LocalLock:
    """Exclusive create by ``os.link`` of a complete temporary file; replace by ``os.replace``
    under an ``flock`` of the folder, checking the version (the file's inode and mtime) read."""

    def __init__(self, uri: str) -> None:
        self.path = Path(uri)
        self.made_folder = False  # removed again on release if the run wrote nothing

    def _temp(self, record: dict[str, Any]) -> Path:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.made_folder = True
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(record) + "\n")
        return tmp

    def create(self, record: dict[str, Any]) -> bool:
        tmp = self._temp(record)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(text), (st.st_ino, st.st_mtime_ns)
        except ValueError:  # not ours to judge: an unreadable lease is treated as a gone holder
            return {"holder": f"an unreadable {self.path.name}", "heartbeat": 0}, (
                st.st_ino, st.st_mtime_ns)

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """Check-and-replace under an exclusive ``flock`` of the folder itself."""
        import fcntl

        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def replace(self, record: dict[str, Any], version: Any) -> bool:
        with self._guarded():
            if self.read()[1] != version:
                return False
            os.replace(self._temp(record), self.path)
            return True

    def delete(self, version: Any) -> None:
        with self._guarded():
            if self.read()[1] == version:
                self.path.unlink()
        if self.made_folder and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()  # a run refused before it wrote anything leaves no folder


class _S3Lock:
    """Conditional writes through boto3 (pyarrow's S3 filesystem cannot send them); the version
    is the object's ETag."""

    def __init__(self, uri: str) -> None:
        parsed = urlparse(uri)
        self.bucket, self.key = parsed.netloc, parsed.path.lstrip("/")

    @staticmethod
    def _client() -> Any:
        import boto3

        return boto3.client("s3")  # endpoint, region and credentials: the standard AWS chain

    @staticmethod
    def _refused(error: Exception) -> bool:
        code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def _put(self, record: dict[str, Any], **condition: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client().put_object(Bucket=self.bucket, Key=self.key,
                                      Body=(json.dumps(record) + "\n").encode(), **condition)
            return True
        except ClientError as e:
            if self._refused(e):
                return False
            raise OSError(f"cannot write s3://{self.bucket}/{self.key}: {e}") from None

    def create(self, record: dict[str, Any]) -> bool:
        return self._put(record, IfNoneMatch="*")

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        from botocore.exceptions import ClientError

        try:
            got = self._client().get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise OSError(f"cannot read s3://{self.bucket}/{self.key}: {e}") from None
        body = got["Body"].read()
        try:
            return json.loads(body), got["ETag"]
        except ValueError:
            return {"holder": f"an unreadable {LOCK_FILE}", "heartbeat": 0}, got["ETag"]

    def replace(self, record: dict[str, Any], version: Any) -> bool:
        return self._put(record, IfMatch=version)

    def delete(self, version: Any) -> None:
        self._client().delete_object(Bucket=self.bucket, Key=self.key)
