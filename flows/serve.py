"""`lens serve`: the published site on 127.0.0.1, read through fsspec (local folder or bucket)."""

from __future__ import annotations

import mimetypes
import posixpath
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from lens_core.store import filesystem

mimetypes.add_type("image/webp", ".webp")


def make_server(publish_url: str, storage_options: dict[str, Any] | None = None, port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 for the site at `publish_url` (port 0 picks a free port)."""
    fs, root = filesystem(publish_url, storage_options)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            rel = posixpath.normpath(unquote(urlsplit(self.path).path)).lstrip("/")
            if rel.startswith("..") or rel == ".":
                rel = ""
            path = posixpath.join(root, rel) if rel else root
            if fs.isdir(path):
                if not self.path.endswith("/") and rel:
                    self.send_response(301)
                    self.send_header("Location", self.path + "/")
                    self.end_headers()
                    return
                path = posixpath.join(path, "index.html")
            try:
                body = fs.cat_file(path)
            except (FileNotFoundError, IsADirectoryError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", mimetypes.guess_type(path)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def serve(publish_url: str, storage_options: dict[str, Any] | None = None, port: int = 8000) -> None:
    server = make_server(publish_url, storage_options, port)
    print(f"serving {publish_url} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
