"""`lens serve`: the published site on 127.0.0.1, read through fsspec (local folder or bucket).

Only what lies under the publish root is served: a request path is decoded strictly, refused
(400) when it holds a NUL, a control character or a backslash, and normalized before use; in a
local folder, a file or directory whose real path (symlinks resolved) leaves the root is 404.
A directory's redirect names the normalized path, re-quoted, never the raw request.
"""

from __future__ import annotations

import mimetypes
import os
import posixpath
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote

from fsspec.implementations.local import LocalFileSystem

from lens_core.store import filesystem

mimetypes.add_type("image/webp", ".webp")
TEXT_TYPES = ("application/javascript", "application/json", "image/svg+xml")  # besides text/*


class BadPath(ValueError):
    """A request path that names no file: undecodable, a NUL or control character, a backslash."""


def site_path(target: str) -> str:
    """The normalized path of a request target relative to the site root ('' for the root).

    The query and fragment are dropped; `..` cannot climb above the root. Raises BadPath.
    """
    if not target.startswith("/"):
        raise BadPath(target)  # absolute-form or asterisk targets are not for a static site
    raw = target.split("?", 1)[0].split("#", 1)[0]
    try:
        path = unquote(raw, errors="strict")
    except UnicodeDecodeError as err:
        raise BadPath(target) from err
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise BadPath(target)
    return posixpath.normpath("/" + path).lstrip("/")


def location(rel: str) -> str:
    """The redirect target of directory `rel`: '/', its quoted segments, '/' (never '//' first)."""
    return "/" + "".join(quote(seg, safe="") + "/" for seg in rel.split("/") if seg)


def content_type(path: str) -> str:
    """The Content-Type of a file by its name; text types say they are UTF-8."""
    kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"{kind}; charset=utf-8" if kind.startswith("text/") or kind in TEXT_TYPES else kind


class SiteFiles:
    """The files of a published site: a fsspec filesystem and root, never anything outside it."""

    def __init__(self, publish_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = filesystem(publish_url, storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.real_root = os.path.realpath(self.root) if self.local else self.root

    def resolve(self, rel: str) -> str | None:
        """The path to read for `rel`: its real path in a local folder, None when that leaves the
        root."""
        path = posixpath.join(self.root, rel) if rel else self.root
        if not self.local:
            return path  # object stores have no links; site_path keeps keys under the root
        real = os.path.realpath(path)
        return real if os.path.commonpath([real, self.real_root]) == self.real_root else None

    def is_dir(self, rel: str) -> bool:
        """Whether `rel` is a directory inside the root."""
        path = self.resolve(rel)
        return path is not None and bool(self.fs.isdir(path))

    def page(self, rel: str) -> str | None:
        """The file to send for `rel` (a directory's index.html), or None."""
        if self.is_dir(rel):
            rel = posixpath.join(rel, "index.html")
        return self.resolve(rel)

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)


def make_handler(files: SiteFiles) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving GET and HEAD from `files`."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802 - http.server API
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            try:
                rel = site_path(self.path)
                slash = self.path.split("?", 1)[0].split("#", 1)[0].endswith("/")
                if rel and not slash and files.is_dir(rel):
                    self._redirect(location(rel))
                    return
                path = files.page(rel)
                data = files.read(path) if path is not None else None
            except BadPath:
                self.send_error(HTTPStatus.BAD_REQUEST)
                return
            except (OSError, ValueError):  # missing, a directory without index.html, unreadable
                data = None
            if data is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type(path))
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _redirect(self, target: str) -> None:
            self.send_response(HTTPStatus.MOVED_PERMANENTLY)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def make_server(
    publish_url: str, storage_options: dict[str, Any] | None = None, port: int = 8000
) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 for the site at `publish_url` (port 0 picks a free port)."""
    return ThreadingHTTPServer(
        ("127.0.0.1", port), make_handler(SiteFiles(publish_url, storage_options))
    )


def serve(
    publish_url: str, storage_options: dict[str, Any] | None = None, port: int = 8000
) -> None:
    server = make_server(publish_url, storage_options, port)
    print(f"serving {publish_url} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
