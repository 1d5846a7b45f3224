"""A site that grows while the run goes on (issue 24): class pages publish as classes finish, the
index never links to a page that does not exist, renders fill in, the final publish equals a
one-shot publish; the renders that matter most come first, and `maco.top_k` caps them.

The flow is simulated with lens_core alone (prepare_run / run_class / render_batch /
finalize_viz, `PartialSite` after each step), on local disk and on the S3 test server.
"""

from __future__ import annotations

import html.parser
import json
import posixpath
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny import TINY, tiny_config

from lens_core import layout, renders
from lens_core.config import make_config
from lens_core.pipeline import prepare_run, run_class
from lens_core.publish import PartialSite, publish
from lens_core.store import filesystem

CLASSES = ["0", "1", "2"]
SKIP_SCHEMES = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#|//)", re.I)


class _Refs(html.parser.HTMLParser):
    """Every href and src of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("href", "src", "data-plain", "data-alpha") and v]


def broken_links(pages: dict[str, bytes], exists: Callable[[str], bool]) -> list[str]:
    """`page -> target` for every local link of the pages (publish-relative paths -> bytes) whose
    target does not exist, every page that is not whole, plus every class in data/classes.json
    without a page (the search and "random class" link them). Pages are read before `exists` is
    asked: anything written before a page is there when it is checked."""
    bad = []
    for page, body in pages.items():
        if page.endswith(".html"):
            if not body.rstrip().endswith(b"</html>"):
                bad.append(f"{page}: half a page")
            parser = _Refs()
            parser.feed(body.decode())
            for ref in parser.refs:
                if SKIP_SCHEMES.match(ref):
                    continue
                target = posixpath.normpath(
                    posixpath.join(posixpath.dirname(page), ref.split("#")[0].split("?")[0])
                )
                if ref.split("#")[0].split("?")[0] and not exists(target):
                    bad.append(f"{page} -> {ref}")
        elif page.endswith("data/classes.json"):
            run = posixpath.dirname(posixpath.dirname(page))
            for c in json.loads(body):
                target = posixpath.join(run, "classes", c["slug"], "index.html")
                if not exists(target):
                    bad.append(f"{page} -> {target}")
    return bad


def crawl(
    read: Callable[[str], bytes | None], exists: Callable[[str], bool], start: list[str]
) -> tuple[int, list[str]]:
    """A reader arriving at the `start` pages and following every link: (pages read, broken
    links). Each page is read before the files it links are looked up."""
    seen, todo, bad = set(start), list(start), []
    while todo:
        page = todo.pop()
        body = read(page)
        if body is None:
            continue
        broken = broken_links({page: body}, exists)
        bad += broken
        if page.endswith(".html"):
            parser = _Refs()
            parser.feed(body.decode())
            for ref in parser.refs:
                target = posixpath.normpath(
                    posixpath.join(posixpath.dirname(page), ref.split("#")[0].split("?")[0])
                )
                if target.endswith(".html") and not SKIP_SCHEMES.match(ref) and target not in seen:
                    seen.add(target)
                    todo.append(target)
    return len(seen), bad


class LocalSite:
    def __init__(self, root: Path):
        self.root = root

    def snapshot(self) -> dict[str, bytes]:
        return {
            p.relative_to(self.root).as_posix(): p.read_bytes()
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and ".tmp-" not in p.name
        }

    def pages(self) -> dict[str, bytes]:
        return {
            p.relative_to(self.root).as_posix(): p.read_bytes()
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and (p.suffix == ".html" or p.name == "classes.json")
        }

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()


class S3Site:
    def __init__(self, url: str, storage_options: dict[str, Any]):
        self.fs, self.root = filesystem(url, storage_options)

    def _rel(self, key: str) -> str:
        return key[len(self.root) + 1 :]

    def snapshot(self) -> dict[str, bytes]:
        keys = self.fs.find(self.root)
        return {self._rel(k): self.fs.cat_file(k) for k in keys}

    def pages(self) -> dict[str, bytes]:
        keys = [k for k in self.fs.find(self.root) if k.endswith((".html", "/classes.json"))]
        return {self._rel(k): self.fs.cat_file(k) for k in keys}

    def exists(self, rel: str) -> bool:
        return self.fs.exists(posixpath.join(self.root, rel))


def check(site: LocalSite | S3Site) -> dict[str, bytes]:
    pages = site.pages()
    assert broken_links(pages, site.exists) == []
    return pages


def _config(root: Path, publish: str, **extra: Any) -> Any:
    cfg = tiny_config(root, publish=publish, **extra)
    return make_config(cfg, classes=CLASSES)


def _grow(
    info: Any, pub: PartialSite, site: LocalSite | S3Site, after: Callable[[], None] = lambda: None
) -> list:
    """The flow's order: each class's chain, its page at once; a class's renders once the next
    class is done (renders queue behind chains); the final publish. Checks every step."""
    snapshots = []
    run_dir = info.run_id
    for i, slug in enumerate(info.slugs):
        run_class(info, slug)
        out = pub.pages([slug])
        assert out["pages"] == [slug]
        after()
        pages = check(site)
        index = pages[f"{run_dir}/index.html"].decode()
        assert f'href="classes/{slug}/index.html"' in index
        for later in info.slugs[i + 1 :]:  # still running: a card without a link, no page
            assert f"classes/{later}/index.html" not in index and not site.exists(
                f"{run_dir}/classes/{later}/index.html"
            )
        snapshots.append(pages)
        if i:
            prev = info.slugs[i - 1]
            renders.render_batch(info, renders.pending_items(info, [prev]))
            assert renders.finalize_viz(info, [prev]) == [prev]
            pub.pages([prev])
            after()
            snapshots.append(check(site))
    renders.render_batch(info, renders.pending_items(info))
    renders.finalize_viz(info)
    pub.pages(info.slugs)
    pub.finish()
    after()
    snapshots.append(check(site))
    return snapshots


def _same_site(a: dict[str, bytes], b: dict[str, bytes], run_id: str) -> None:
    """Equal file by file, but for the publish timestamps (run.json and the runs page)."""
    stamped = {"index.html", f"{run_id}/run.json"}
    assert sorted(a) == sorted(b)
    different = [p for p in a if p not in stamped and a[p] != b[p]]
    assert different == []


def test_partial_site_on_disk_never_links_a_missing_page(tmp_path):
    info = prepare_run(_config(tmp_path, f"file://{tmp_path}/site"))
    site = LocalSite(tmp_path / "site")
    pub = PartialSite(info, interval_s=0)  # every update written: every moment is checked
    first_page: dict[str, bytes] = {}

    def after() -> None:
        if not first_page:
            first_page.update(site.snapshot())

    snapshots = _grow(info, pub, site, after)
    run = info.run_id
    first = snapshots[0]
    # after the first class: the index and that class's page exist; the others are pending cards
    index = first[f"{run}/index.html"].decode()
    assert index.count('class="card pending"') == len(CLASSES) - 1 and "2 still running" in index
    page = first[f"{run}/classes/{info.slugs[0]}/index.html"].decode()
    assert "rendering…" in page and "assets/viz/" not in page  # renders come later
    assert not [p for p in first_page if p.startswith(f"{run}/assets/viz/")]
    listed = json.loads(first[f"{run}/data/classes.json"])
    assert [c["slug"] for c in listed] == [info.slugs[0]]
    # the first class's renders are finalized after the second class: its page fills in
    filled = snapshots[2][f"{run}/classes/{info.slugs[0]}/index.html"].decode()
    assert "rendering…" not in filled and "assets/viz/" in filled
    # the final site is whole: no pending card, no placeholder, equal to a one-shot publish
    final = site.snapshot()
    assert 'class="card pending"' not in final[f"{run}/index.html"].decode()
    assert not any(
        b"rendering\xe2\x80\xa6" in body for p, body in final.items() if p.endswith(".html")
    )
    publish(info, f"file://{tmp_path}/oneshot")
    _same_site(final, LocalSite(tmp_path / "oneshot").snapshot(), run)


def test_a_reader_during_the_run_never_sees_a_broken_link(tmp_path):
    """A reader polling the site while classes and renders publish, arriving through the run's
    index: every page it reaches links only to files that exist (assets before pages, pages
    before the index, whole-file renames). (The very first index and method page link each other:
    one is written first, while nothing links to it yet.)"""
    info = prepare_run(_config(tmp_path, f"file://{tmp_path}/site"))
    site = LocalSite(tmp_path / "site")
    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []

    def read(rel: str) -> bytes | None:
        try:
            return (site.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def reader() -> None:
        start = [f"{info.run_id}/index.html", f"{info.run_id}/data/classes.json"]
        while not stop.is_set():
            n, bad = crawl(read, site.exists, start)
            errors.extend(bad)
            seen.append(n)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        _grow(info, PartialSite(info, interval_s=0), site)
    finally:
        stop.set()
        t.join(30)
    assert errors == []
    assert len(set(seen)) > 1  # it did read the site while it grew


def test_partial_site_on_s3(tmp_path, s3, bucket):
    """On object storage: the same invariants at every step, and the final site equals a one-shot
    publish of the same store (compared object by object)."""
    url = f"s3://{bucket}/site"
    info = prepare_run(_config(tmp_path, url, storage_options=s3.storage_options))
    site = S3Site(url, s3.storage_options)
    snapshots = _grow(info, PartialSite(info, interval_s=0), site)
    assert 'class="card pending"' in snapshots[0][f"{info.run_id}/index.html"].decode()
    publish(info, f"s3://{bucket}/oneshot")
    _same_site(
        site.snapshot(),
        S3Site(f"s3://{bucket}/oneshot", s3.storage_options).snapshot(),
        info.run_id,
    )


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_index_updates_are_rate_limited(tmp_path):
    """Pages publish at once; the index at most once per interval (the first at once), a pending
    update written by `flush` once due. A stale index still links only to existing pages."""
    info = prepare_run(_config(tmp_path, f"file://{tmp_path}/site"))
    clock = Clock()
    pub = PartialSite(info, interval_s=10, clock=clock)
    site = LocalSite(tmp_path / "site")
    assert pub.due_in() is None
    run_class(info, info.slugs[0])
    assert pub.pages([info.slugs[0]])["index"] is not None  # the first class: its index at once
    for t, slug in ((1.0, info.slugs[1]), (2.0, info.slugs[2])):
        clock.t = t
        run_class(info, slug)
        assert pub.pages([slug])["index"] is None  # within the interval: page only
        assert site.exists(f"{info.run_id}/classes/{slug}/index.html")
        check(site)
    index = (tmp_path / "site" / info.run_id / "index.html").read_text()
    assert index.count('class="card pending"') == 2  # stale, never broken
    assert pub.due_in() == pytest.approx(8.0)
    assert pub.flush() is None
    clock.t = 10.0
    assert pub.due_in() == 0.0 and pub.flush() is not None and pub.due_in() is None
    assert (
        'class="card pending"' not in (tmp_path / "site" / info.run_id / "index.html").read_text()
    )
    writes = pub.stats["index_writes"]
    assert pub.flush(force=True) is None and pub.stats["index_writes"] == writes  # nothing pending


def test_a_running_class_stays_pending(tmp_path):
    """`pages` of a class that is neither complete nor failed publishes nothing for it."""
    info = prepare_run(_config(tmp_path, f"file://{tmp_path}/site"))
    pub = PartialSite(info, interval_s=0)
    assert pub.pages([info.slugs[0]]) == {"pages": [], "index": None}
    assert not (tmp_path / "site" / info.run_id).exists()


def test_renders_come_by_rank_across_classes(tmp_path):
    info = prepare_run(_config(tmp_path, f"file://{tmp_path}/site"))
    for slug in info.slugs:
        run_class(info, slug)
    store = info.store()
    items = renders.pending_items(info)
    order = {s: renders.concept_order(store, s) for s in info.slugs}
    rank = [order[s].index(c) for s, c in items]
    assert rank == sorted(rank)  # every class's first concept before any class's second, ...
    for r in range(TINY["concepts"]["n_concepts"]):  # ... within a rank, classes in label order
        assert [s for (s, _), k in zip(items, rank, strict=True) if k == r] == info.slugs
    per_class = [renders.pending_items(info, [s]) for s in info.slugs]
    # the flow's queue, re-sorted
    assert renders.by_rank([x for p in per_class for x in p]) == items


def test_top_k_renders_only_the_top_concepts_and_a_larger_k_only_the_missing(tmp_path):
    root = tmp_path
    small = prepare_run(_config(root, f"file://{root}/site", maco={**TINY["maco"], "top_k": 1}))
    for slug in small.slugs:
        run_class(small, slug)
    store = small.store()
    items = renders.pending_items(small)
    assert items == [(s, renders.concept_order(store, s)[0]) for s in small.slugs]
    renders.render_batch(small, items)
    assert sorted(renders.finalize_viz(small)) == sorted(small.slugs)
    assert renders.pending_items(small) == []  # rendered for what it shows
    publish(small)
    page = (root / "site" / small.run_id / "data" / f"{small.slugs[0]}.json").read_text()
    concepts = json.loads(page)["concepts"]
    top = renders.concept_order(store, small.slugs[0])[0]
    assert [c["id"] for c in concepts if c["viz"]] == [top] and not any(
        c["viz_pending"] for c in concepts
    )

    larger = prepare_run(_config(root, f"file://{root}/site", maco={**TINY["maco"], "top_k": 2}))
    assert larger.run_id == small.run_id  # the same run: top_k is not part of its identity
    items = renders.pending_items(larger)
    assert items == [
        (s, renders.concept_order(store, s)[1]) for s in larger.slugs
    ]  # only the missing
    assert renders.render_batch(larger, items)["rendered"] == len(larger.slugs)
    assert sorted(renders.finalize_viz(larger)) == sorted(larger.slugs)
    marker = json.loads(
        (
            root / "store" / "runs" / larger.run_id / layout.viz(larger.slugs[0]) / "_SUCCESS"
        ).read_text()
    )
    assert sorted(marker["concepts"]) == sorted(renders.concept_order(store, larger.slugs[0])[:2])
    smaller = prepare_run(_config(root, f"file://{root}/site", maco={**TINY["maco"], "top_k": 1}))
    assert renders.pending_items(smaller) == []  # what a larger K rendered covers a smaller one
    everything = prepare_run(_config(root, f"file://{root}/site"))
    assert len(renders.pending_items(everything)) == len(everything.slugs)  # the third concepts


def test_top_k_is_not_part_of_the_run_id():
    base = make_config({})
    assert make_config({"maco": {"top_k": 3}}).method_dict() == base.method_dict()
    assert make_config({"maco": {"steps": 3}}).method_dict() != base.method_dict()
