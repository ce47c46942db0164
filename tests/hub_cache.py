"""Put files into a Hugging Face hub cache folder in huggingface_hub's own layout, as a download
would have left them (no network):

    <cache>/models--ORG--NAME/blobs/<hash>                       the contents
    <cache>/models--ORG--NAME/snapshots/<commit>/<file>          relative symlink to its blob
    <cache>/models--ORG--NAME/refs/main                          <commit>
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from mmkit.checksum import file_digest


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], move: bool = False) -> Path:
    """Cache ``files`` ({name in the repo: a file, or its bytes}) as revision ``main`` of model
    repo ``repo_id``; returns the snapshot folder. ``move``: move the given files instead of
    copying them (large weights)."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    blobs = {}
    for name, content in files.items():
        if isinstance(content, bytes):
            blob = hashlib.sha256(content).hexdigest()
            (repo / "blobs" / blob).write_bytes(content)
        else:
            blob = file_digest(content, "sha256")
            (shutil.move if move else shutil.copyfile)(str(content), str(repo / "blobs" / blob))
        blobs[name] = blob
    commit = hashlib.sha1("".join(f"{n}:{b}\n" for n, b in sorted(blobs.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, blob in blobs.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def add_folder_to_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Cache every file under ``folder`` (a model saved with ``save_pretrained``) as ``repo_id``."""
    folder = Path(folder)
    return add_to_hub_cache(cache, repo_id, {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()})


class LocalHub:
    """A Hugging Face hub stand-in on 127.0.0.1 serving ``files`` ({(repo_id, name): bytes}) at
    ``/{repo_id}/resolve/{revision}/{name}`` with the headers huggingface_hub reads (commit, etag,
    size), and the repo info and file tree ``snapshot_download`` lists (``/api/models/...``),
    counting the GETs of each file (``gets['ORG/NAME/file']``): point ``HF_ENDPOINT`` at ``url``."""

    def __init__(self, files: dict[tuple[str, str], bytes]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.files = files
        self.gets: dict[str, int] = {}
        lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _file(self) -> tuple[str, bytes | None]:
                repo, _, rest = self.path.partition("/resolve/")
                name = rest.partition("/")[2]
                return f"{repo.strip('/')}/{name}", hub.files.get((repo.strip("/"), name))

            def _headers(self, data: bytes | None) -> None:
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_HEAD(self) -> None:  # http.server calls do_<METHOD>
                self._headers(self._file()[1])

            def _api(self) -> None:
                import json

                repo, _, rest = self.path.split("?")[0][len("/api/models/"):].partition("/tree/")
                if not rest:
                    repo = repo.partition("/revision/")[0]
                names = sorted(n for r, n in hub.files if r == repo)
                if rest:
                    body = [{"type": "file", "path": n, "size": len(hub.files[(repo, n)]),
                             "oid": hashlib.sha1(hub.files[(repo, n)]).hexdigest()} for n in names]
                else:
                    body = {"id": repo, "sha": "0" * 40, "siblings": [{"rfilename": n} for n in names]}
                data = json.dumps(body).encode()
                self.send_response(200 if names else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/api/models/"):
                    self._api()
                    return
                name, data = self._file()
                self._headers(data)
                if data is not None:
                    with lock:
                        hub.gets[name] = hub.gets.get(name, 0) + 1
                    self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
