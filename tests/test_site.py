"""The static site: build to a folder and to S3, then drive it in headless Chromium."""

from __future__ import annotations

import functools
import http.server
import json
import mimetypes
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from site_fixtures import FAILED_ERROR, make_site

from lens_core.site import SiteError, build_site
from lens_core.site.render import json_for_html

sync_api = pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "site"
PREFIX = "atlas/run1"  # publish into a sub-folder: every link must be relative
SCRIPT_NAME = "<script>alert(1)</script>"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # the browser dropping a connection mid-image (navigating away) is not an error here


def _serve(handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _bucket_handler(fs, bucket: str):
    """Serve GET /<key> from an S3 bucket through s3fs (a stand-in for S3 static hosting)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            key = self.path.split("?", 1)[0].split("#", 1)[0].lstrip("/")
            try:
                body = fs.cat_file(f"{bucket}/{key}")
            except (FileNotFoundError, IsADirectoryError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header(
                "Content-Type", mimetypes.guess_type(key)[0] or "application/octet-stream"
            )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[dict]:
    """The 6-class synthetic site built under <www>/atlas/run1 and served on loopback."""
    www = tmp_path_factory.mktemp("www")
    site, assets = make_site()
    summary = build_site(site, str(www / PREFIX), None, assets)
    server, origin = _serve(functools.partial(_Quiet, directory=str(www)))
    yield {
        "www": www,
        "root": www / PREFIX,
        "site": site,
        "summary": summary,
        "origin": origin,
        "base": f"{origin}/{PREFIX}/",
    }
    server.shutdown()


class Tab:
    """A page in a fresh browser context that records every request and every dialog."""

    def __init__(self, browser, **ctx):
        self.context = browser.new_context(**ctx)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def check(self, allowed_prefix: str) -> None:
        """No request left the site (nor its sub-folder), no dialog fired, no script error."""
        outside = [u for u in self.requests if not u.startswith(allowed_prefix)]
        assert self.requests and not outside, outside
        assert self.dialogs == []
        assert self.errors == []
        self.context.close()


@pytest.fixture
def tab(browser, built) -> Iterator[Tab]:
    t = Tab(browser, viewport={"width": 1280, "height": 800}, color_scheme="light")
    yield t
    t.check(built["base"])


def _visible_names(page) -> list[str]:
    return page.eval_on_selector_all(
        "#grid > li:not([hidden]) .nm", "els => els.map(e => e.textContent)"
    )


def _class(site: dict, name: str) -> dict:
    return next(c for c in site["classes"] if c["name"] == name)


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # let lazy images load
    page.wait_for_timeout(150)
    page.evaluate("window.scrollTo(0, 0)")
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000
    return path


# ---- browser: index ---------------------------------------------------------------------------


def test_index_lists_every_class_with_counts(tab, built):
    page = tab.page
    page.goto(built["base"] + "index.html")
    names = [c["name"] for c in built["site"]["classes"]]
    assert _visible_names(page) == names  # the <script> name is shown as text, nothing ran
    counts = page.inner_text(".counts")
    n_concepts = sum(len(c["concepts"]) for c in built["site"]["classes"] if c["status"] == "ok")
    assert "6 classes" in counts and f"{n_concepts} concepts" in counts and "1 failed" in counts
    failed = page.locator("#grid > li.failed")
    assert (
        failed.count() == 1
        and "tabby cat" in failed.inner_text()
        and "failed" in failed.inner_text()
    )
    assert page.locator("#grid img").count() == 5
    # thumbnails load lazily: wait for every one to decode (a broken one never does: timeout)
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#grid img'))"
        ".every(i => i.complete && i.naturalWidth > 0)",
        timeout=15_000,
    )
    _screenshot(page, "index-desktop.png")
    page.set_viewport_size({"width": 390, "height": 844})
    _screenshot(page, "index-phone.png")


def test_search_narrows_the_grid_as_you_type(tab, built):
    page = tab.page
    page.goto(built["base"] + "index.html")
    box = page.locator("#q")
    box.press_sequentially("sha")  # no Enter: filtering happens on each keystroke
    assert _visible_names(page) == ["great white shark", "tiger shark"]
    box.press_sequentially("rk")
    assert _visible_names(page) == ["great white shark", "tiger shark"]
    assert "Showing 2 of 6" in page.inner_text("#shown")
    box.fill("")
    box.press_sequentially("ristretto")  # a synonym
    assert _visible_names(page) == ["espresso"]
    box.fill("")
    box.press_sequentially("cafe")  # accent-insensitive synonym match ("café crème")
    assert _visible_names(page) == ["espresso"]
    box.fill("")
    box.press_sequentially("WHITE pointer")
    assert _visible_names(page) == ["great white shark"]
    box.fill("")
    box.press_sequentially("zzzz")
    assert _visible_names(page) == [] and page.is_visible("#none")
    box.fill("")
    box.press_sequentially("x")
    box.press("Backspace")
    assert len(_visible_names(page)) == 6
    page.goto(built["base"] + "index.html?q=tiger")  # the class pages' search form lands here
    assert _visible_names(page) == ["tiger shark"]


def test_random_button_lands_on_a_class_page(tab, built):
    page = tab.page
    ok = {c["slug"] for c in built["site"]["classes"] if c["status"] == "ok"}
    page.goto(built["base"] + "index.html")
    page.click("#random")
    page.wait_for_url(re.compile(r".*/classes/[a-z0-9-]+/index\.html$"))
    first = page.url.split("/")[-2]
    assert page.url.startswith(built["base"]) and first in ok
    page.click("#random")  # from a class page: loads data/classes.json, never the same class
    page.wait_for_url(lambda u: "/classes/" in u and f"/{first}/" not in u)
    assert page.url.split("/")[-2] in ok
    assert page.locator("h1").inner_text() in {c["name"] for c in built["site"]["classes"]}
    assert sum(u.endswith("data/classes.json") for u in tab.requests) >= 1


def test_theme_toggle_is_remembered(tab, built, browser):
    page = tab.page
    page.goto(built["base"] + "index.html")
    bg = "() => getComputedStyle(document.body).backgroundColor"
    light = page.evaluate(bg)
    assert page.get_attribute("html", "data-theme") is None
    page.click("#theme")
    assert page.get_attribute("html", "data-theme") == "dark"
    dark = page.evaluate(bg)
    assert dark != light and sum(map(int, re.findall(r"\d+", dark)[:3])) < 100
    assert page.get_attribute("#theme", "aria-pressed") == "true"
    page.goto(built["base"] + "classes/n00000000-espresso/index.html")  # remembered across pages
    assert page.get_attribute("html", "data-theme") == "dark" and page.evaluate(bg) == dark
    page.click("#theme")
    page.reload()
    assert page.get_attribute("html", "data-theme") == "light" and page.evaluate(bg) == light
    # a dark system preference is followed when nothing is stored
    other = Tab(browser, color_scheme="dark")
    other.page.goto(built["base"] + "index.html")
    assert other.page.evaluate(bg) == dark
    other.check(built["base"])


def test_keyboard_reaches_controls_with_visible_focus(tab, built):
    page = tab.page
    page.goto(built["base"] + "classes/n00000004-great-white-shark/index.html")
    tags = page.eval_on_selector_all(
        "#random, #theme, #vt-all, .vt, .more", "els => els.map(e => e.tagName)"
    )
    assert tags and set(tags) == {"BUTTON"}
    seen = []
    for _ in range(12):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
        if seen[-1] == "theme":
            break
    assert seen[0] == "skip" and "q" in seen and "random" in seen and seen[-1] == "theme", seen
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", "")
    page.keyboard.press("Enter")
    assert page.get_attribute("html", "data-theme") == "dark"


# ---- browser: class pages -----------------------------------------------------------------------


def test_class_page_shows_top_concepts_by_importance(tab, built):
    page = tab.page
    data_root = built["root"] / "data"
    for name, expect in [("great white shark", 10), ("tiger shark", 3)]:
        cls = _class(built["site"], name)
        page.goto(built["base"] + f"classes/{cls['slug']}/index.html")
        assert page.locator("h1").inner_text() == name
        shares = page.eval_on_selector_all(".concept .share", "els => els.map(e => e.textContent)")
        assert len(shares) == expect == page.locator(".concept").count()
        # against the input data, sorted here (the fixture lists concepts by id, not importance)
        by_input = sorted(cls["concepts"], key=lambda c: -c["logit_share"])[:expect]
        assert shares == [f"{c['logit_share']:.1f}%" for c in by_input]
        values = [float(s.rstrip("%")) for s in shares]
        assert values == sorted(values, reverse=True) and len(set(values)) > 1
        data = json.loads((data_root / f"{cls['slug']}.json").read_text())
        assert shares == [f"{c['logit_share']:.1f}%" for c in data["concepts"][:expect]]
        ids = page.eval_on_selector_all(".concept", "els => els.map(e => e.id)")
        assert ids == [f"concept-{c['id']}" for c in by_input]
        imp = page.eval_on_selector_all(
            ".concept", "els => els.map(e => e.classList.contains('imp'))"
        )
        assert imp == [c["important"] for c in by_input] and any(imp)
        sobol = page.inner_text(".concept .sobol")
        assert sobol == f"Sobol {by_input[0]['sobol']:.2f}"
        # the images load lazily: bring the second into view and wait for both to decode (a
        # broken image never gets a width, so this times out and fails)
        viz = page.locator(".viz img")
        assert viz.count() >= 2
        viz.nth(1).scroll_into_view_if_needed()
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.viz img')).slice(0, 2)"
            ".every(i => i.complete && i.naturalWidth > 0)",
            timeout=15_000,
        )
    shark = _class(built["site"], "great white shark")
    page.goto(built["base"] + f"classes/{shark['slug']}/index.html")
    _screenshot(page, "class-desktop.png")
    page.set_viewport_size({"width": 390, "height": 844})
    _screenshot(page, "class-phone.png")


def test_crops_expand_and_viz_toggles(tab, built):
    page = tab.page
    page.goto(built["base"] + "classes/n00000004-great-white-shark/index.html")
    first = page.locator(".concept").nth(0)
    visible = (
        "el => Array.from(el.querySelectorAll('.crops img')).filter(i => i.offsetWidth > 0).length"
    )
    assert first.evaluate(visible) == 6
    first.locator(".more").click()
    assert (
        first.evaluate(visible) == 10
        and first.locator(".more").get_attribute("aria-expanded") == "true"
    )
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.concept .crops.open img'))"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    first.locator(".more").click()
    assert first.evaluate(visible) == 6
    second = page.locator(".concept").nth(1)
    second.locator(".crops").click()  # clicking the strip itself expands it
    assert second.evaluate(visible) == 10
    img = first.locator(".viz img")
    assert img.get_attribute("src").endswith(".webp")
    first.locator(".vt").click()
    assert (
        img.get_attribute("src").endswith(".png")
        and first.locator(".vt").get_attribute("aria-pressed") == "true"
    )
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    page.click("#vt-all")
    srcs = page.eval_on_selector_all(".viz img", "els => els.map(e => e.getAttribute('src'))")
    assert all(s.endswith(".png") for s in srcs)


def test_cluster_graph_shows_images_on_focus_and_hover(tab, built):
    page = tab.page
    page.goto(built["base"] + "classes/n00000004-great-white-shark/index.html")
    assert page.locator("#cl path").count() >= 5  # one path per concept colour
    page.focus("#cl")
    cap = page.locator("#cl-panel figcaption")
    assert cap.inner_text().startswith("Image 1 of 200")
    page.keyboard.press("ArrowRight")
    assert cap.inner_text().startswith("Image 2 of 200")
    panel_img = page.locator("#cl-panel img")
    page.wait_for_function(
        "el => el.complete && el.naturalWidth > 0", arg=panel_img.element_handle()
    )
    assert "/assets/thumbs/" in panel_img.evaluate("e => e.src")
    # hover the dot drawn at the first point of the second path
    box = page.evaluate("""() => { const svg = document.getElementById('cl');
        const m = /M([-\\d.]+) ([-\\d.]+)/.exec(svg.querySelectorAll('path')[1].getAttribute('d'));
        const p = new DOMPoint(+m[1], +m[2]).matrixTransform(svg.getScreenCTM());
        return [p.x, p.y]; }""")
    page.mouse.move(box[0], box[1])
    assert cap.inner_text() != "" and page.get_attribute("#cl-cur", "cx") is not None
    assert (
        page.locator("#similarity a").count() == 10  # the 2 concepts past the top 10 are not links
        and page.locator("#similarity circle").count() == 12
        and page.locator("#fidelity polyline").count() == 2
    )


def test_hostile_names_render_as_text(tab, built):
    page = tab.page
    cls = _class(built["site"], SCRIPT_NAME)
    page.goto(built["base"] + f"classes/{cls['slug']}/index.html")
    assert page.locator("h1").inner_text() == SCRIPT_NAME
    assert page.title().startswith(SCRIPT_NAME)
    scripts = page.eval_on_selector_all("script", "els => els.map(e => e.textContent)")
    assert not any("alert(1)" in s for s in scripts)
    # the ../../etc class: a safe slug, a page inside the publish root, its name shown verbatim
    etc = _class(built["site"], "../../etc")
    page.goto(built["base"] + "index.html")
    page.get_by_text("../../etc", exact=True).click()
    page.wait_for_url(built["base"] + f"classes/{etc['slug']}/index.html")
    assert page.locator("h1").inner_text() == "../../etc"
    # the failed class: says so, with its error escaped
    page.goto(built["base"] + "classes/n00000003-tabby-cat/index.html")
    assert "This class failed" in page.inner_text("main")
    assert page.inner_text(".failbox pre") == FAILED_ERROR
    assert page.locator(".failbox b").count() == 0


def test_site_works_from_file_urls(browser, built):
    t = Tab(browser)
    root_url = built["root"].as_uri() + "/"
    t.page.goto(root_url + "index.html")
    assert len(_visible_names(t.page)) == 6
    t.page.click("#grid a >> nth=0")
    t.page.wait_for_url(root_url + "classes/n00000000-espresso/index.html")
    assert t.page.locator(".concept").count() == 10
    t.page.click("#random")  # no fetch on file://: the class list comes from data/classes.js
    t.page.wait_for_url(lambda u: "/classes/" in u and "espresso" not in u)
    t.page.locator("#q").press_sequentially("tiger")
    t.page.wait_for_selector("#suggest a")
    assert t.page.inner_text("#suggest") == "tiger shark"
    t.check(root_url)


# ---- no browser -------------------------------------------------------------------------------


def test_files_layout_and_data(built):
    root, summary = built["root"], built["summary"]
    files = {p.relative_to(built["www"]).as_posix() for p in built["www"].rglob("*") if p.is_file()}
    assert all(f.startswith(PREFIX + "/") for f in files)  # nothing escaped the publish root
    assert not any(".tmp-" in f for f in files)
    slugs = [c["slug"] for c in built["site"]["classes"]]
    for slug in slugs:
        assert (
            f"{PREFIX}/classes/{slug}/index.html" in files and f"{PREFIX}/data/{slug}.json" in files
        )
    listing = json.loads((root / "data" / "classes.json").read_text())
    assert [c["slug"] for c in listing] == slugs
    assert (
        listing[0]["synonyms"] == ["ristretto", "café crème"] and listing[3]["status"] == "failed"
    )
    assert listing[4]["viz"].endswith(".png") and (root / listing[4]["thumb"]).exists()
    js = (root / "data" / "classes.js").read_text()
    assert json.loads(js[js.index("=") + 1 : js.rindex(";")]) == listing
    assert summary["missing_assets"] == [] and summary["failed"] == 1
    for page in root.rglob("*.html"):
        html = page.read_text()
        assert "<script>alert" not in html
        assert not re.search(r'(?:src|href)="(?:/|[a-z]+:)', html), page  # relative links only


def test_escaping_in_html_and_embedded_json(built):
    html = (
        built["root"] / "classes" / "n00000001-script-alert-1-script" / "index.html"
    ).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    failed = (built["root"] / "classes" / "n00000003-tabby-cat" / "index.html").read_text()
    assert "&lt;b&gt;concept 3&lt;/b&gt; &amp; friends" in failed
    text = json_for_html({"name": "</script><!-- x & y \u2028", "n": 1})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"name": "</script><!-- x & y \u2028", "n": 1}


def test_class_page_stays_small():
    site, assets = make_site(
        n_classes=10, n_concepts=10, n_crops=10, n_points=200, image_size=8, distinct_images=False
    )
    for c in site["classes"]:  # longer names than the fixture's, as in ImageNet
        c["name"] = (c["name"] + " with a rather long common name")[:60]
    fs = fsspec.filesystem("memory")
    summary = build_site(site, "memory://small-site", None, assets)
    sizes = {p: fs.size(p) for p in fs.find("/small-site/classes")}
    assert len(sizes) == 10 and max(sizes.values()) == summary["max_class_page_bytes"] < 50_000
    fs.rm("/small-site", recursive=True)


def test_index_is_written_last(built, monkeypatch):
    written = built["summary"]["written"]
    assert written[-1] == "index.html" and written.count("index.html") == 1
    root = built["root"]
    index_time = (root / "index.html").stat().st_mtime_ns
    others = [p for p in root.rglob("*") if p.is_file() and p != root / "index.html"]
    assert others and all(p.stat().st_mtime_ns <= index_time for p in others)
    # the order the filesystem actually saw, through a recording wrapper
    from fsspec.implementations.memory import MemoryFileSystem

    seen: list[str] = []
    original = MemoryFileSystem.pipe_file

    def record(self, path, value, *args, **kwargs):
        seen.append(path)
        return original(self, path, value, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", record)
    site, assets = make_site()
    build_site(site, "memory://order-site", None, assets)
    rel = [p.split("/order-site/", 1)[1] for p in seen]
    assert rel[-1] == "index.html" and rel.count("index.html") == 1
    pages = [i for i, p in enumerate(rel) if p.startswith(("classes/", "data/"))]
    assert len(pages) == 2 * 6 + 2 and max(pages) < rel.index("index.html")
    fsspec.filesystem("memory").rm("/order-site", recursive=True)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["classes"][2].update(slug="../../etc"),
        lambda s: s["classes"][0].update(slug="Espresso"),
        lambda s: s["classes"][0].update(slug="a/b"),
        lambda s: s["classes"][0].update(slug=""),
        lambda s: s["classes"][1].update(slug=s["classes"][0]["slug"]),
        lambda s: s["classes"][0]["concepts"][0].update(viz="https://cdn.example.com/x.png"),
        lambda s: s["classes"][0]["concepts"][0].update(crops=["../../../etc/passwd"]),
        lambda s: s["classes"][0]["concepts"][0].update(viz="/abs/x.png"),
        lambda s: s["classes"][0]["concepts"][0]["similar"][0].update(slug="<x>"),
        lambda s: s["classes"][0].update(status="weird"),
    ],
)
def test_unsafe_data_is_refused_before_writing(tmp_path, mutate):
    site, assets = make_site(n_classes=6, n_points=10)
    mutate(site)
    with pytest.raises(SiteError):
        build_site(site, str(tmp_path / "pub"), None, assets)
    assert not (tmp_path / "pub").exists()


@pytest.mark.parametrize(
    "key", ["../outside.png", "assets/../../x.png", "index.html", "assets/lens.js", "/assets/x.png"]
)
def test_unsafe_asset_paths_are_refused(tmp_path, key):
    site, _ = make_site(n_classes=2, n_points=5)
    with pytest.raises(SiteError):
        build_site(site, str(tmp_path / "pub"), None, {key: b"x"})
    assert not (tmp_path / "pub").exists()


# ---- S3 --------------------------------------------------------------------------------------


def test_publish_to_s3_and_browse(s3, browser, built):
    bucket = s3.new_bucket()
    site, assets = make_site()
    t0 = time.perf_counter()
    summary = build_site(site, f"s3://{bucket}/{PREFIX}", s3.storage_options, assets)
    elapsed = time.perf_counter() - t0
    fs = s3.filesystem()
    keys = {k.split(f"{bucket}/{PREFIX}/", 1)[1] for k in fs.find(f"{bucket}/{PREFIX}")}
    local = {
        p.relative_to(built["root"]).as_posix() for p in built["root"].rglob("*") if p.is_file()
    }
    assert keys == local and summary["written"][-1] == "index.html", elapsed
    assert (
        fs.cat_file(f"{bucket}/{PREFIX}/index.html") == (built["root"] / "index.html").read_bytes()
    )
    with pytest.raises(PermissionError):  # credentials are really needed
        build_site(site, f"s3://{bucket}/other", {**s3.storage_options, "secret": "wrong"}, {})
    server, origin = _serve(_bucket_handler(fs, bucket))
    try:
        base = f"{origin}/{PREFIX}/"
        t = Tab(browser)
        t.page.goto(base + "index.html")
        assert _visible_names(t.page) == [c["name"] for c in site["classes"]]
        t.page.click("#grid a >> nth=4")
        t.page.wait_for_url(base + "classes/n00000004-great-white-shark/index.html")
        assert t.page.locator(".concept").count() == 10
        t.page.wait_for_function(
            "() => { const i = document.querySelector('.viz img'); "
            "return i.complete && i.naturalWidth > 0; }"
        )
        t.check(base)
    finally:
        server.shutdown()
