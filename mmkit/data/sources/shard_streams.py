"""Opens a WebDataset shard wherever it lives, as a stream read once from front to back.

A shard location is, as in webdataset and open_clip:

- a local path (or a ``file://`` URL);
- ``pipe:COMMAND``: a shell command writing the tar to its standard output, e.g.
  ``pipe:aws s3 cp s3://bucket/shard-000.tar -`` (the command comes from the user's own config and
  runs through the shell, as webdataset runs it);
- a URL of any protocol fsspec knows: ``s3://`` (needs the ``s3fs`` package), ``gs://`` (``gcsfs``),
  ``http://`` and ``https://`` (``aiohttp``, installed with mmkit as ``fsspec[http]``), ...

Remote shards are streamed, never downloaded whole first. A failing command or URL raises an
``OSError`` naming it (and, for a command, its exit status and the end of its standard error).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
PIPE_PREFIX = "pipe:"
# How to install what a common protocol needs (the mmkit extras s3 and gcs add these packages).
_INSTALL = {
    "s3": "pip install s3fs (or pip install 'mmkit[s3]')", "s3a": "pip install s3fs (or pip install 'mmkit[s3]')",
    "gs": "pip install gcsfs (or pip install 'mmkit[gcs]')", "gcs": "pip install gcsfs (or pip install 'mmkit[gcs]')",
    "http": "pip install 'fsspec[http]'", "https": "pip install 'fsspec[http]'",
}
_STDERR_KEPT = 1024  # bytes of a command's standard error quoted in its error
_EXIT_WAIT_S = 60.0  # how long a command may take to exit once its output has ended


class PipeCommandError(OSError):
    """A ``pipe:`` command ended with a non-zero exit status."""


class ShardReadError(OSError):
    """A URL that could not be opened or read, whatever the error type of the filesystem's library
    (aiohttp's for HTTP status errors, for instance), so that callers handle every failure alike."""


class StopReading(Exception):
    """Raise inside ``open_shard`` to leave a shard unfinished on purpose (e.g. after a probe):
    a command is stopped without being judged by its exit status."""


def is_remote(location: str) -> bool:
    """A ``pipe:`` command or a URL (other than ``file://``): neither can be globbed or stat'ed."""
    return location.startswith(PIPE_PREFIX) or (protocol(location) not in (None, "file"))


def protocol(location: str) -> str | None:
    m = _URL.match(location)
    return m.group(1).lower() if m else None


def local_path(location: str) -> str:
    """The path of a ``file://`` URL; anything else unchanged."""
    if protocol(location) == "file":
        return unquote(urlparse(location).path)
    return location


def check_reader(location: str) -> None:
    """Raise now, with what to install, if ``location`` needs a package that is missing (e.g.
    ``s3fs`` for ``s3://``) or names a protocol fsspec does not know."""
    proto = protocol(location)
    if location.startswith(PIPE_PREFIX) or proto in (None, "file"):
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(proto)
    except ImportError as e:
        hint = f": {_INSTALL[proto]}" if proto in _INSTALL else ""
        raise ImportError(f"reading {proto}:// shards ({location}) needs a package that is not installed{hint} "
                          f"[fsspec: {e}]") from e
    except ValueError as e:
        raise ValueError(f"{location}: fsspec knows no protocol {proto!r} ({e}); use a local path, "
                         "pipe:COMMAND, or a URL such as s3://, gs://, https://") from e


@contextlib.contextmanager
def open_shard(location: str, storage_options: dict[str, Any] | None = None) -> Iterator[ShardStream]:
    """The shard's bytes as a ``ShardStream``. Leaving the block normally checks that a command
    succeeded (raising ``PipeCommandError`` otherwise); leaving it early stops the command."""
    if location.startswith(PIPE_PREFIX):
        with _pipe(location[len(PIPE_PREFIX):]) as stream:
            yield stream
        return
    if is_remote(location):
        import fsspec

        proto = protocol(location)
        try:
            fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
            # block_size=0: fsspec's HTTP files then stream instead of asking the server for ranges
            raw = fs.open(path, "rb", **({"block_size": 0} if proto in ("http", "https") else {}))
        except FileNotFoundError as e:
            # fsspec's HTTP filesystem says "not found" for any failed request (a 403, a refused
            # connection) and keeps the reason as the cause: name it.
            cause = e.__cause__
            if cause is None:
                raise
            raise FileNotFoundError(f"{e} ({type(cause).__name__}: {cause})") from e
        except OSError:
            raise
        except Exception as e:  # errors of the filesystem's own library, e.g. aiohttp's
            raise ShardReadError(f"{location}: {type(e).__name__}: {e}") from e
        with raw:
            yield ShardStream(raw, location)
        return
    with open(local_path(location), "rb") as raw:
        yield ShardStream(raw)


class ShardStream:
    """A read-only stream that remembers its last bytes, so that the end-of-archive check (is
    there a zero block where tarfile stopped?) needs no seeking and works on pipes and URLs.

    ``read(n)`` returns n bytes unless the stream ends first (network files may return fewer)."""

    _KEEP = 64 * 1024  # more than tarfile's read size plus a block: where it stopped is in here

    def __init__(self, raw: Any, url: str | None = None) -> None:
        self.raw = raw
        self.url = url  # set for library-backed streams, whose read errors are not all OSErrors
        self.position = 0  # bytes handed out so far
        self._chunks: collections.deque[bytes] = collections.deque()
        self._kept = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data = self._read_raw(-1)
        else:
            parts, got = [], 0
            while got < n:
                part = self._read_raw(n - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            data = b"".join(parts)
        self._remember(data)
        return data

    def _read_raw(self, n: int) -> bytes:
        if self.url is None:
            return self.raw.read(n)
        try:
            return self.raw.read(n)
        except OSError:
            raise
        except Exception as e:  # e.g. aiohttp.ClientPayloadError when a connection drops mid-shard
            raise ShardReadError(f"{self.url}: {type(e).__name__}: {e}") from e

    def _remember(self, data: bytes) -> None:
        if not data:
            return
        self.position += len(data)
        self._chunks.append(data)
        self._kept += len(data)
        while self._kept - len(self._chunks[0]) >= self._KEEP:
            self._kept -= len(self._chunks.popleft())

    def has_end_of_archive(self, offset: int) -> bool:
        """Whether a zero block starts at ``offset`` (where tarfile stopped). tarfile ends quietly
        when a file is cut between two blocks, or when a header block is garbage; only the missing
        end-of-archive block tells such a shard from a shorter one."""
        start = self.position - self._kept
        if offset < start:
            return True  # cannot tell: not expected, as tarfile reads at most a record ahead
        kept = b"".join(self._chunks)[offset - start:offset - start + tarfile.BLOCKSIZE]
        block = kept + self.read(tarfile.BLOCKSIZE - len(kept)) if len(kept) < tarfile.BLOCKSIZE else kept
        return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


class _StderrTail:
    """Reads a command's standard error in a thread (a full stderr pipe would block the command),
    keeping its last bytes for the error message."""

    def __init__(self, stream: Any) -> None:
        self.data = b""
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: Any) -> None:
        with stream:
            for chunk in iter(lambda: stream.read(1024), b""):
                self.data = (self.data + chunk)[-_STDERR_KEPT:]

    def text(self, wait_s: float = 5.0) -> str:
        self._thread.join(timeout=wait_s)
        return self.data.decode("utf-8", "replace").strip()


@contextlib.contextmanager
def _pipe(command: str) -> Iterator[ShardStream]:
    # Its own process group, so that stopping it also stops what it started (`a | b`, a wrapper).
    process = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL,  # shell: webdataset's pipe: semantics
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    stderr = _StderrTail(process.stderr)
    stream = ShardStream(process.stdout)
    try:
        yield stream
    except (GeneratorExit, StopReading):  # the reader stopped early (an epoch's quota): the rest is not wanted
        _stop(process)
        raise
    except BaseException as e:
        # A broken tar is often the command failing mid-way (lost connection, no credentials):
        # report the command's failure, which says why, rather than the tar error it caused.
        failure = _failure(command, process, stderr, wait_s=2.0)
        _stop(process)
        if failure is not None:
            raise failure from e
        raise
    else:
        # The tar has ended: what may follow is padding. Closing the pipe ends a command still
        # writing it with SIGPIPE, which (as in webdataset) is not a failure.
        process.stdout.close()
        try:
            process.wait(timeout=_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            _stop(process)
            raise PipeCommandError(f"pipe command {command!r} did not exit within {_EXIT_WAIT_S:.0f} s "
                                   "after its tar ended; stopped it") from None
        failure = _failure(command, process, stderr, wait_s=0)
        if failure is not None:
            raise failure
    finally:
        process.stdout.close()


def _failure(command: str, process: subprocess.Popen, stderr: _StderrTail, wait_s: float) -> PipeCommandError | None:
    """The command's failure, if it has exited (within ``wait_s``) with a status other than 0 or
    SIGPIPE's."""
    try:
        status = process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return None
    if status in (0, 128 + signal.SIGPIPE, -signal.SIGPIPE):
        return None
    said = stderr.text()
    return PipeCommandError(f"pipe command {command!r} exited with status {status}"
                            + (f"; its error output ends: {said}" if said else " and no error output"))


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:  # (once reaped, its id may belong to someone else)
        if hasattr(os, "killpg"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    process.wait()
