"""The cost of publishing while the run goes on (issue 24): writes and seconds per class of a
`PartialSite` (each class's page as it finishes, again once its renders are finalized, the index
rate-limited, then the final publish) against the final-only publish, measured in the same run on
the same store.

The toy atlas is computed first (not timed); publishing is then timed in the flow's order: every
class's page before its renders, the renders (not timed), every class's page again, `finish`.
Every file write is counted at the one writer (`SiteWriter.write_many`), for both.

Usage: python bench/bench_progressive.py [--classes 10] [--interval 0 10] [--s3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lens_core import renders  # noqa: E402
from lens_core.config import make_config  # noqa: E402
from lens_core.pipeline import prepare_run, run_class  # noqa: E402
from lens_core.publish import PartialSite, publish  # noqa: E402
from lens_core.site.builder import SiteWriter  # noqa: E402

CONFIG: dict[str, Any] = {
    "data": {"toy_images_per_class": 4, "images_per_class": 4},
    "patches": {"grid": 2},
    "concepts": {"n_concepts": 5},
    "importance": {"n_designs": 4, "images": 2},
    "crops": {"per_concept": 3, "attribution_images": 2},
    "maco": {"steps": 2, "image_size": 64, "crops": 2},
}


class Counter:
    """Counts the files and bytes every SiteWriter writes (puts on S3, renames on disk)."""

    def __init__(self) -> None:
        self.files = self.bytes = 0
        self._orig = SiteWriter.write_many
        counter = self

        def write_many(writer: SiteWriter, items: Any) -> None:
            items = list(items)
            counter.files += len(items)
            counter.bytes += sum(len(b) for _, b in items)
            counter._orig(writer, items)

        SiteWriter.write_many = write_many  # type: ignore[method-assign]

    def take(self) -> tuple[int, int]:
        out = (self.files, self.bytes)
        self.files = self.bytes = 0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=10, help="toy classes (at most 10)")
    ap.add_argument(
        "--interval",
        type=float,
        nargs="+",
        default=[0.0, 10.0],
        help="index intervals to measure (LENS_INDEX_INTERVAL_S); 0 = every update",
    )
    ap.add_argument(
        "--s3", action="store_true", help="publish to a SeaweedFS S3 server on loopback"
    )
    args = ap.parse_args()
    n = max(1, min(10, args.classes))
    with tempfile.TemporaryDirectory(prefix="lens-bench-progressive-") as tmp:
        server = None
        options: dict[str, Any] = {}
        base = f"file://{tmp}/site"
        if args.s3:
            from s3server import start_s3_server

            server = start_s3_server(Path(tmp) / "weed")
            options = server.storage_options
            base = f"s3://{server.new_bucket()}"
        try:
            cfg = make_config(
                {
                    **CONFIG,
                    "store": f"file://{tmp}/store",
                    "publish": base,
                    "storage_options": options,
                },
                classes=[str(i) for i in range(n)],
            )
            info = prepare_run(cfg)
            for slug in info.slugs:
                run_class(info, slug)
            publish(info, f"{base}/warm-up")  # imports, templates, caches: out of every figure
            counter = Counter()
            rows = []
            rendered = False
            for interval in args.interval:
                pub = PartialSite(info, f"{base}/partial-{interval:g}", interval_s=interval)
                t = time.perf_counter()
                first_page = None
                for slug in info.slugs:  # each class's page as its chain ends, renders to come
                    pub.pages([slug])
                    first_page = first_page or time.perf_counter() - t
                early = time.perf_counter() - t
                if not rendered:  # the renders, once (not timed)
                    renders.render_batch(info, renders.pending_items(info))
                    renders.finalize_viz(info)
                    rendered = True
                t = time.perf_counter()
                for slug in info.slugs:  # each class's page again as its renders are finalized
                    pub.pages([slug])
                fill = time.perf_counter() - t
                t = time.perf_counter()
                pub.finish()
                final = time.perf_counter() - t
                files, nbytes = counter.take()
                rows.append(
                    (
                        f"partial, index every {interval:g} s",
                        files,
                        nbytes,
                        early + fill + final,
                        first_page or 0.0,
                        pub.stats["index_writes"],
                    )
                )
            t = time.perf_counter()
            publish(info, f"{base}/final-only")
            seconds = time.perf_counter() - t
            files, nbytes = counter.take()
            base_row = ("final-only publish", files, nbytes, seconds, seconds, 0)
        finally:
            if server is not None:
                server.stop()
    where = "S3 (SeaweedFS, loopback)" if args.s3 else "local disk"
    print(
        f"{n} toy classes, {CONFIG['concepts']['n_concepts']} concepts each, published to {where}"
    )
    print(
        f"{'':32} {'writes':>7} {'per class':>9} {'MB':>6} {'seconds':>8} {'s/class':>8} "
        f"{'first page s':>12} {'index writes':>12} {'writes x':>8} {'seconds x':>9}"
    )
    for name, files, nbytes, secs, first, index in [base_row, *rows]:
        print(
            f"{name:32} {files:7d} {files / n:9.1f} "
            f"{nbytes / 1e6:6.2f} {secs:8.2f} {secs / n:8.3f} "
            f"{first:12.2f} {index:12d} {files / base_row[1]:8.2f} {secs / base_row[3]:9.2f}"
        )
    print(
        "first page s: seconds from the first publish call to the first class page and index "
        "(final-only: the whole publish, which comes after every class and render)"
    )


if __name__ == "__main__":
    main()
