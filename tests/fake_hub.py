"""A Hugging Face Hub on the loopback interface, serving one model repository from a local folder
with the part of the Hub's HTTP API that `huggingface_hub.snapshot_download` uses: repository
info by revision, the file tree, and file downloads. Tests point `HF_ENDPOINT` at it, so
`vlaflow download hf:...` runs its real code without reaching the network."""

import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class _Repository:
    def __init__(self, repo_id: str, folder: Path, commit: str, branches: dict[str, str]):
        self.repo_id, self.commit = repo_id, commit
        self.refs = {commit: commit, **branches}
        self.files = {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision)

    def tree(self) -> list[dict]:
        return [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in self.files.items()
        ]


def _handler(repository: _Repository, requests: list[str]):
    prefix = f"/api/models/{repository.repo_id}/"
    files = f"/{repository.repo_id}/resolve/"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, content, status: int = 200):
            self._send(status, json.dumps(content).encode(), {"Content-Type": "application/json"})

        def _not_found(self, code: str):
            self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code})

        def _route(self, head: bool):
            path = unquote(urlparse(self.path).path)
            requests.append(f"{self.command} {path}")
            if path.startswith(prefix + "revision/"):
                commit = repository.resolve(path.removeprefix(prefix + "revision/"))
                if commit is None:
                    return self._not_found("RevisionNotFound")
                siblings = [{"rfilename": name} for name in repository.files]
                return self._json({"id": repository.repo_id, "sha": commit, "siblings": siblings, "private": False})
            if path.startswith(prefix + "tree/"):
                commit = repository.resolve(path.removeprefix(prefix + "tree/").split("/")[0])
                if commit is None:
                    return self._not_found("RevisionNotFound")
                return self._json(repository.tree())
            if path.startswith(files):
                revision, _, name = path.removeprefix(files).partition("/")
                commit = repository.resolve(revision)
                if commit is None or name not in repository.files:
                    return self._not_found("EntryNotFound" if commit else "RevisionNotFound")
                data = repository.files[name]
                headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                return self._send(200, data, headers, head=head)
            return self._not_found("RepoNotFound")

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    return Handler


@contextmanager
def fake_hub(repo_id: str, folder: Path, commit: str, branches: dict[str, str] | None = None):
    """Serve `folder` as `repo_id` at `commit` (and each branch name pointing at a commit); yields
    the endpoint URL and the list of requests received."""
    requests: list[str] = []
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), _handler(_Repository(repo_id, folder, commit, branches or {}), requests)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
