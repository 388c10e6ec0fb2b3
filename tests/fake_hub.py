"""A FAKE Hugging Face Hub on loopback, for testing rackbench's real download code.

The real Hub is unreachable from build machines. This serves the few endpoints
``huggingface_hub.snapshot_download`` uses (the repo tree at a revision, and
HEAD/GET of ``/<repo>/resolve/<revision>/<file>``) for one repo at one pinned
revision, and records every request with its Authorization header.
"""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, files, repo_id, revision):
        self.files, self.repo_id, self.revision = files, repo_id, revision
        self.requests = []

    def start(self):
        hub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _file(self):
                prefix = f"/{hub.repo_id}/resolve/{hub.revision}/"
                if self.path.startswith(prefix):
                    return self.path[len(prefix) :]

            def _send(self, body, data, headers):
                """200 with these headers and Content-Length; the data itself for GET (body), not HEAD."""
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self.handle_any(body=False)

            def do_GET(self):
                self.handle_any(body=True)

            def handle_any(self, body):
                hub.requests.append((self.command, self.path, self.headers.get("authorization")))
                if self.path.startswith(f"/api/models/{hub.repo_id}/revision/{hub.revision}"):
                    info = {"id": hub.repo_id, "sha": hub.revision, "siblings": [{"rfilename": n} for n in hub.files]}
                    return self._send(body, json.dumps(info).encode(), {"Content-Type": "application/json"})
                if self.path.startswith(f"/api/models/{hub.repo_id}/tree/{hub.revision}"):
                    tree = [
                        {
                            "type": "file",
                            "path": n,
                            "size": len(d),
                            "oid": hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest(),
                        }
                        for n, d in hub.files.items()
                    ]
                    return self._send(body, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                name = self._file()
                if name in hub.files:
                    data = hub.files[name]
                    etag = '"%s"' % hashlib.sha256(data).hexdigest()
                    return self._send(body, data, {"X-Repo-Commit": hub.revision, "ETag": etag})
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)  # loopback only
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def downloaded(self):
        """Names of files fetched with GET."""
        prefix = f"/{self.repo_id}/resolve/{self.revision}/"
        return sorted(p[len(prefix) :] for method, p, _ in self.requests if method == "GET" and p.startswith(prefix))
