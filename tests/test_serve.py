"""`lens serve` over real HTTP on 127.0.0.1: the site is served, nothing outside it is.

Each test starts flows.serve.make_server on port 0 in a thread and sends raw requests with
http.client (the request target goes on the wire exactly as written).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from flows.serve import make_server

PAGE = "<!doctype html><meta charset=utf-8><title>é</title>"


@contextmanager
def running(publish_url: str, storage_options: dict[str, Any] | None = None) -> Iterator[int]:
    """make_server on a free port, serving in a thread; yields the port."""
    server = make_server(publish_url, storage_options, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def get(port: int, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request for the raw `target`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A small published site, a secret beside it, and symlinks from the site out to it."""
    root = tmp_path / "site"
    (root / "classes" / "espresso").mkdir(parents=True)
    (root / "index.html").write_text(PAGE, encoding="utf-8")
    (root / "classes" / "espresso" / "index.html").write_text("<p>espresso</p>", encoding="utf-8")
    (root / "data").mkdir()
    (root / "data" / "atlas.json").write_text('{"classes": []}')
    (root / "a b").mkdir()
    (root / "a b" / "index.html").write_text("spaced")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0:SECRET\n")
    (root / "passwd").symlink_to(secret / "passwd")  # a file link out of the root
    (root / "outside").symlink_to(secret)  # a directory link out of the root
    (root / "inside.html").symlink_to(root / "index.html")  # a link that stays inside
    return root


def test_serves_pages_with_their_content_types(site: Path) -> None:
    """The index, a class page (via its directory), JSON and a link that stays inside the root."""
    with running(str(site)) as port:
        status, headers, body = get(port, "/")
        assert status == 200 and body.decode("utf-8") == PAGE
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert get(port, "/classes/espresso/")[2] == b"<p>espresso</p>"
        status, headers, body = get(port, "/data/atlas.json?v=1")
        assert (
            status == 200
            and headers["content-type"].startswith("application/json")
            and b"classes" in body
        )
        assert get(port, "/inside.html")[2].decode("utf-8") == PAGE
        assert get(port, "/a%20b/")[2] == b"spaced"
        assert get(port, "/missing.html")[0] == 404
        status, headers, body = get(port, "/index.html", method="HEAD")
        assert (
            status == 200 and body == b"" and headers["content-length"] == str(len(PAGE.encode()))
        )


def test_symlinks_out_of_the_publish_root_are_not_followed(site: Path) -> None:
    """A link in the site to a file or a directory outside it is 404, never its content."""
    with running(str(site)) as port:
        for target in ("/passwd", "/outside/passwd", "/outside/", "/outside", "/classes/../passwd"):
            status, _, body = get(port, target)
            assert status == 404, (target, status)
            assert b"SECRET" not in body


@pytest.mark.parametrize(
    "target",
    [
        "/%00",
        "/index.html%00.png",
        "/classes%00/",
        "/%ff%fe",
        "/a%0d%0aX-Evil:%201",
        "/..%5c..%5cpasswd",
        "*",
    ],
)
def test_nul_and_invalid_paths_get_a_clean_client_error(site: Path, target: str) -> None:
    """A NUL, an undecodable byte, a control character or a backslash: 400 (or 404), and the
    server keeps answering (the old server raised and dropped the connection on /%00)."""
    with running(str(site)) as port:
        status, headers, body = get(port, target)
        assert status in (400, 404), (target, status)
        assert "x-evil" not in headers and b"Traceback" not in body
        assert get(port, "/")[0] == 200


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/classes", "/classes/"),
        ("/classes/espresso?x=1", "/classes/espresso/"),
        ("//evil.example/../classes", "/classes/"),  # the old server echoed the raw path
        ("/%2Fevil.example/../classes", "/classes/"),
        ("/a%20b", "/a%20b/"),
    ],
)
def test_directory_redirect_names_the_normalized_path_only(
    site: Path, target: str, expected: str
) -> None:
    """A 301's Location is built from the normalized, re-quoted path: one leading '/', no host."""
    with running(str(site)) as port:
        status, headers, _ = get(port, target)
        assert status == 301, (target, status)
        assert headers["location"] == expected
        assert not headers["location"].startswith("//")


def test_serves_a_site_from_s3(s3: Any, bucket: str) -> None:
    """The same server reads an s3:// publish URL through fsspec (a real S3 server)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    fs.pipe(f"{bucket}/site/index.html", PAGE.encode("utf-8"))
    fs.pipe(f"{bucket}/site/classes/espresso/index.html", b"<p>espresso</p>")
    with running(f"s3://{bucket}/site", s3.storage_options) as port:
        status, headers, body = get(port, "/")
        assert status == 200 and body.decode("utf-8") == PAGE
        assert headers["content-type"] == "text/html; charset=utf-8"
        status, headers, _ = get(port, "/classes/espresso")
        assert status == 301 and headers["location"] == "/classes/espresso/"
        assert get(port, "/classes/espresso/")[2] == b"<p>espresso</p>"
        assert get(port, "/%00")[0] == 400
        assert get(port, "/../../other/index.html")[0] == 404
