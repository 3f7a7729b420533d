"""A recorder of the Kubernetes API on 127.0.0.1: it keeps the body of every Job and JobSet created through it and
answers 201, as an API server does; every other request (reading a Job's status, listing pods) is refused with 403,
so a `kubernetes step` command stops right after its submission. Not a cluster: nothing is scheduled or run."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class KubeRecorder:
    def __init__(self):
        self.created: list[dict] = []  # {"kind", "namespace", "body"}
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                parts = self.path.split("?")[0].strip("/").split("/")
                kind = parts[-1]
                namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts else None
                meta = body.setdefault("metadata", {})
                meta.setdefault("name", (meta.get("generateName") or "obj-") + uuid.uuid4().hex[:5])
                meta.update(namespace=namespace, uid=str(uuid.uuid4()))
                recorder.created.append({"kind": kind, "namespace": namespace, "body": body})
                self._answer(201, body)

            def do_GET(self):
                self._answer(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "Forbidden", "code": 403, "message": "a recorder, not a cluster"})

            do_DELETE = do_PATCH = do_PUT = do_GET

            def _answer(self, code: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path, namespace: str) -> str:
        """A kubeconfig pointing the Kubernetes client at this recorder."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "recorder",
            "clusters": [{"name": "recorder", "cluster": {"server": self.url}}],
            "contexts": [{"name": "recorder", "context": {"cluster": "recorder", "user": "recorder",
                                                          "namespace": namespace}}],
            "users": [{"name": "recorder", "user": {"token": "not-a-secret"}}]}))
        return str(path)

    def close(self):
        self.server.shutdown()
