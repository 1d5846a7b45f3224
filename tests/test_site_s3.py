"""A site published to object storage works as a website; the runs page lists only real runs.

Against a real S3 server (SeaweedFS, credentials enforced): every object carries its Content-Type
and Cache-Control, the static files are content-addressed, the site renders in Chromium through
`lens serve` and straight from the S3 endpoint (the bucket made publicly readable, as a static
web host), and planted run.json files never become links on the runs page.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import posixpath
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from site_fixtures import make_site

from flows.serve import make_server
from lens_core.site import SiteError, build_site
from lens_core.site.headers import IMAGE, IMMUTABLE, PAGE, REVALIDATE, cache_control, object_headers
from lens_core.site.render import immutable_paths, static_paths
from lens_core.site.runs import list_published_runs, write_runs_index

RUN_ID = "0123456789ab"  # the form lens_core.identity.short_hash gives
HTML, CSS, JS = (
    "text/html; charset=utf-8",
    "text/css; charset=utf-8",
    "text/javascript; charset=utf-8",
)
JSON = "application/json; charset=utf-8"


def run_meta(run_id: str = RUN_ID, **fields) -> dict:
    """A run.json as lens_core.publish writes it."""
    return {
        "run_id": run_id, "published": "2026-11-22T10:00:00+00:00",
        "created": "2026-11-22T09:00:00Z", "model": "toy-cnn", "layer": "block4",
        "checkpoint": None, "checkpoint_digest": "sha256:" + "ab" * 32, "classes": 6, "failed": 1,
        **fields,
    }  # fmt: skip


@pytest.fixture(scope="module")
def published(s3) -> dict:
    """The 6-class synthetic site at s3://<bucket>/site/<RUN_ID>/, with the runs page above it."""
    bucket = s3.new_bucket()
    base = f"s3://{bucket}/site"
    site, assets = make_site(n_classes=6, n_crops=3, n_points=20, n_thumbs=4)
    site["run"]["run_id"] = RUN_ID
    summary = build_site(site, f"{base}/{RUN_ID}", s3.storage_options, assets)
    write_runs_index(base, run_meta(), s3.storage_options)
    return {"bucket": bucket, "base": base, "site": site, "summary": summary}


def _head(fs, path: str) -> dict:
    """The stored object's HTTP headers, from a real HEAD request (botocore's head_object)."""
    bucket, key = path.split("/", 1)
    return fs.call_s3("head_object", Bucket=bucket, Key=key)


def _kinds(published: dict) -> dict[str, tuple[str, str]]:
    """One publish-relative path of each kind of object -> (Content-Type, Cache-Control)
    it must have."""
    slug = next(c["slug"] for c in published["site"]["classes"] if c["status"] == "ok")
    static = static_paths()
    run = f"{RUN_ID}/"
    return {
        "index.html": (HTML, REVALIDATE),  # the runs page
        f"{run}run.json": (JSON, REVALIDATE),
        f"{run}index.html": (HTML, REVALIDATE),
        f"{run}data/classes.json": (JSON, REVALIDATE),
        f"{run}data/classes.js": (JS, REVALIDATE),
        f"{run}method.html": (HTML, PAGE),
        f"{run}classes/{slug}/index.html": (HTML, PAGE),
        f"{run}data/{slug}.json": (JSON, PAGE),
        run + static["css"]: (CSS, IMMUTABLE),
        run + static["js"]: (JS, IMMUTABLE),
        run + static["icon"]: ("image/svg+xml", IMMUTABLE),
        f"{run}assets/viz/{slug}/0.png": ("image/png", IMAGE),
        f"{run}assets/viz/{slug}/0.webp": ("image/webp", IMAGE),
        f"{run}assets/crops/{slug}/0_0.webp": ("image/webp", IMAGE),
    }


def test_every_kind_of_object_has_its_content_type_and_cache_control(s3, published):
    fs = s3.filesystem()
    root = f"{published['bucket']}/site"
    wrong = {}
    for rel, want in _kinds(published).items():
        head = _head(fs, f"{root}/{rel}")
        got = (head.get("ContentType"), head.get("CacheControl"))
        if got != want:
            wrong[rel] = got
    assert not wrong, wrong


def test_no_published_object_is_a_download(s3, published):
    """Every object of the site has a known type (never binary/octet-stream) and a cache policy."""
    fs = s3.filesystem()
    keys = fs.find(f"{published['bucket']}/site")
    assert len(keys) == published["summary"]["files"] + 2  # + run.json and the runs page
    bad = {}
    for key in keys:
        head = _head(fs, key)
        if head.get("ContentType", "").split(";")[0] in (
                "", "binary/octet-stream", "application/octet-stream"
        ) or not head.get("CacheControl"):  # fmt: skip
            bad[key] = (head.get("ContentType"), head.get("CacheControl"))
    assert not bad, list(bad.items())[:5]


def test_static_files_are_content_addressed(s3, published):
    """The pages link lens.<hash>.css/js and favicon.<hash>.svg, and each hash is of those bytes."""
    fs = s3.filesystem()
    root = f"{published['bucket']}/site/{RUN_ID}"
    page = fs.cat_file(f"{root}/index.html").decode()
    for kind, rel in static_paths().items():
        assert f'"{rel}"' in page, (kind, rel)
        data = fs.cat_file(f"{root}/{rel}")
        digest = posixpath.basename(rel).split(".")[-2]
        assert len(digest) == 10 and hashlib.sha256(data).hexdigest().startswith(digest), rel
    assert "?v=" not in page


def test_local_publish_keeps_its_files_and_leaves_no_temporaries(tmp_path):
    site, assets = make_site(n_classes=6, n_crops=3, n_points=20, n_thumbs=4)
    summary = build_site(site, str(tmp_path / "pub"), None, assets)
    files = {
        p.relative_to(tmp_path / "pub").as_posix()
        for p in (tmp_path / "pub").rglob("*")
        if p.is_file()
    }
    assert files == set(summary["written"])
    assert set(static_paths().values()) | {"index.html"} <= files


@pytest.mark.parametrize(
    ("rel", "ctype", "cache"),
    [
        ("index.html", HTML, REVALIDATE),
        ("0123456789ab/run.json", JSON, REVALIDATE),
        ("data/classes.js", JS, REVALIDATE),
        ("classes/a/index.html", HTML, PAGE),
        ("assets/crops/a/0_1.jpg", "image/jpeg", IMAGE),
        ("assets/crops/a/0_1.JPEG", "image/jpeg", IMAGE),
        ("assets/lens.0123456789.css", CSS, IMAGE),  # hash-like but not one of the site's own files
    ],
)
def test_headers_by_path(rel, ctype, cache):
    assert object_headers(rel, immutable_paths()) == {"ContentType": ctype, "CacheControl": cache}
    assert all(cache_control(p, immutable_paths()) == IMMUTABLE for p in static_paths().values())


@pytest.mark.parametrize(
    "key", [*static_paths().values(), "assets/lens.css", "assets/lens.js", "assets/favicon.svg"]
)
def test_an_asset_may_not_take_a_static_files_name(tmp_path, key):
    site, _ = make_site(n_classes=2, n_points=5)
    with pytest.raises(SiteError):
        build_site(site, str(tmp_path / "pub"), None, {key: b"x"})
    assert not (tmp_path / "pub").exists()


# ---- the site in a browser ---------------------------------------------------------------------


@pytest.fixture
def page(browser) -> Iterator:
    """A page in a fresh context; fails the test on a script error or a dialog."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"error: {e}"))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    pg.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))
    yield pg
    context.close()
    assert problems == []


@pytest.fixture
def served(s3, published) -> Iterator[str]:
    """`lens serve` of the s3:// publish URL on a free loopback port: its origin."""
    server = make_server(published["base"], s3.storage_options, port=0)
    server.handle_error = lambda *args: None  # the browser leaving mid-image is not an error here
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _visible_names(pg) -> list[str]:
    return pg.eval_on_selector_all(
        "#grid > li:not([hidden]) .nm", "els => els.map(e => e.textContent)"
    )


def _assert_styled_and_scripted(page) -> None:
    """On a run's index: lens.css is applied, lens.js runs (search, random class), images load."""
    style = page.evaluate(  # lens.css's background and heading size, not the browser's defaults
        "() => [getComputedStyle(document.body).backgroundColor, "
        "getComputedStyle(document.querySelector('h1')).fontSize]"
    )
    assert style == ["rgb(250, 250, 249)", "28.8px"]
    page.locator("#q").press_sequentially("shark")  # filters as you type
    assert _visible_names(page) == ["great white shark", "tiger shark"]
    page.click("#random")
    page.wait_for_url(re.compile(f"/{RUN_ID}/classes/[a-z0-9-]+/index.html$"))
    assert page.locator(".concept").count() > 0
    page.wait_for_function(  # its first render (a fixed name under assets/) loads too
        "() => { const i = document.querySelector('.viz img'); "
        "return i.complete && i.naturalWidth > 0; }",
        timeout=15_000,
    )


def test_site_served_from_s3_renders_with_its_css_and_js(page, served, published):
    page.goto(f"{served}/")  # the runs page: this run is listed and linked
    page.click(f'a[href="{RUN_ID}/index.html"]')
    page.wait_for_url(f"{served}/{RUN_ID}/index.html")
    assert page.locator("h1").inner_text() == "LENS atlas"
    assert _visible_names(page) == [c["name"] for c in published["site"]["classes"]]
    _assert_styled_and_scripted(page)


def test_site_renders_straight_from_the_s3_endpoint(page, s3, published):
    """The bucket as a static web host (anonymous reads): the browser gets what S3 stored."""
    fs = s3.filesystem()
    bucket = published["bucket"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
              "Action": ["s3:GetObject"], "Resource": [f"arn:aws:s3:::{bucket}/*"]}]}  # fmt: skip
    fs.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps(policy))
    base = f"{s3.endpoint_url}/{bucket}/site"
    response = page.goto(f"{base}/index.html")  # a document, not a download
    assert (response.headers["content-type"], response.headers["cache-control"]) == (
        HTML,
        REVALIDATE,
    )
    page.click(f'a[href="{RUN_ID}/index.html"]')
    page.wait_for_url(f"{base}/{RUN_ID}/index.html")
    assert page.evaluate("document.contentType") == "text/html"
    assert page.locator("h1").inner_text() == "LENS atlas"
    _assert_styled_and_scripted(page)
    css = page.request.get(f"{base}/{RUN_ID}/{static_paths()['css']}")
    assert (css.headers["content-type"], css.headers["cache-control"]) == (CSS, IMMUTABLE)


class _Puts:
    """put_object calls seen by s3fs: their arguments, and the most in flight at once."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.in_flight = self.peak = 0


@pytest.fixture
def puts(monkeypatch) -> _Puts:
    import s3fs

    seen = _Puts()
    original = s3fs.S3FileSystem._call_s3

    async def record(self, method, *args, **kwargs):
        if method != "put_object":
            return await original(self, method, *args, **kwargs)
        seen.calls.append(kwargs)
        seen.in_flight += 1
        seen.peak = max(seen.peak, seen.in_flight)
        try:
            return await original(self, method, *args, **kwargs)
        finally:
            seen.in_flight -= 1

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", record)
    return seen


def test_every_put_sends_content_type_and_cache_control(s3, bucket, puts):
    """What AWS S3 stores is what the put sends (SeaweedFS would guess a type from the name)."""
    site, assets = make_site(n_classes=3, n_crops=2, n_points=5, n_thumbs=2)
    site["run"]["run_id"] = RUN_ID
    summary = build_site(site, f"s3://{bucket}/site/{RUN_ID}", s3.storage_options, assets)
    write_runs_index(f"s3://{bucket}/site", run_meta(), s3.storage_options)
    assert len(puts.calls) == summary["files"] + 2
    missing = [
        p["Key"] for p in puts.calls if not p.get("ContentType") or not p.get("CacheControl")
    ]
    assert not missing, missing[:5]
    types = {posixpath.splitext(p["Key"])[1]: p["ContentType"] for p in puts.calls}
    assert types == {".html": HTML, ".css": CSS, ".js": JS, ".json": JSON, ".svg": "image/svg+xml",
                     ".png": "image/png", ".webp": "image/webp"}  # fmt: skip


def test_a_batch_with_several_header_sets_is_put_at_once(s3, bucket, puts):
    """Grouping by headers keeps one concurrent batch:
    64 pages and data files all in flight together."""
    from lens_core.site.builder import BATCH, SiteWriter
    from lens_core.store import filesystem

    out = SiteWriter(*filesystem(f"s3://{bucket}/site", s3.storage_options))
    out.write_many(
        (f"classes/c{i}/index.html" if i % 2 else f"data/c{i}.json", b"{}") for i in range(BATCH)
    )
    assert len(puts.calls) == BATCH and puts.peak == BATCH
    assert {p["CacheControl"] for p in puts.calls} == {PAGE}
    assert {p["ContentType"] for p in puts.calls} == {HTML, JSON}


# ---- the runs page: only real runs -------------------------------------------------------------


class _Links(html.parser.HTMLParser):
    """Every href of a page, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.hrefs += [v for k, v in attrs if k == "href"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _plant(fs, root: str, folder: str, meta) -> None:
    fs.makedirs(f"{root}/{folder}", exist_ok=True)
    fs.pipe_file(
        f"{root}/{folder}/run.json",
        (meta if isinstance(meta, bytes) else json.dumps(meta).encode()),
    )


HOSTILE = "<img src=x onerror=alert(1)>"


def _plant_all(fs, root: str) -> None:
    """run.json files a writer of the publish URL could plant, and one odd but real run."""
    _plant(fs, root, "javascript:alert(1)", run_meta("javascript:alert(1)"))
    _plant(fs, root, "x", run_meta("javascript:alert(1)"))
    _plant(fs, root, "fedcba987654", run_meta("0a0a0a0a0a0a"))  # a real-looking id, another folder
    _plant(fs, root, "ABCDEF012345", run_meta("ABCDEF012345"))  # upper case: not the project's form
    _plant(fs, root, "bbbbbbbbbbbb", b"\xff not json")
    _plant(fs, root, "cccccccccccc", ["not", "an", "object"])
    _plant(fs, root, "aaaaaaaaaaaa", run_meta(
        "aaaaaaaaaaaa", published="2026-11-21T00:00:00+00:00", checkpoint=f"{HOSTILE}\"'",
        model=HOSTILE, layer={"x": HOSTILE}, checkpoint_digest=["</code><script>alert(1)</script>"],
        classes="<b>9</b>", failed=True,
    ))  # fmt: skip


@pytest.mark.parametrize("where", ["file", "s3"])
def test_runs_page_links_only_real_runs(where, tmp_path, browser, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        fs, root = s3.filesystem(), f"{s3.new_bucket()}/site"
        url, opts = f"s3://{root}", s3.storage_options
    else:
        import fsspec

        fs, root = fsspec.filesystem("file"), str(tmp_path / "site")
        url, opts = root, None
    _plant_all(fs, root)
    # the run's own site is written before the runs page
    fs.makedirs(f"{root}/{RUN_ID}", exist_ok=True)
    write_runs_index(url, run_meta(), opts)
    runs = list_published_runs(url, opts)
    assert [r["run_id"] for r in runs] == [RUN_ID, "aaaaaaaaaaaa"]
    page = fs.cat_file(f"{root}/index.html").decode()
    links = _Links()
    links.feed(page)
    assert links.hrefs == [f"{RUN_ID}/index.html", "aaaaaaaaaaaa/index.html"]
    assert "javascript" not in page and "<script>alert" not in page and "<img" not in page
    assert HOSTILE in "".join(links.text)  # shown as text
    if where == "file":  # and in a browser: no script runs, no dialog, both links work
        context = browser.new_context()
        try:
            pg = context.new_page()
            dialogs: list[str] = []
            pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            pg.goto(Path(root, "index.html").as_uri())
            assert pg.locator("tbody tr").count() == 2 and pg.locator("img, script").count() == 0
            assert dialogs == []
        finally:
            context.close()


@pytest.mark.parametrize(
    "run_id", ["javascript:alert(1)", "../../x", "0123456789AB", "0123456789ab\n", "", None]
)
def test_write_runs_index_refuses_a_malformed_run_id(tmp_path, run_id):
    with pytest.raises(ValueError):
        write_runs_index(str(tmp_path / "site"), run_meta(run_id))
    assert not (tmp_path / "site").exists()
