"""Tell Prefect that a checkpoint landed: the `lens.checkpoint.created` event.

Training jobs call `emit_checkpoint_created(url)` (or `python -m flows.events URL`) after writing a
checkpoint whole. The watch-checkpoints deployment's trigger (deploy/prefect.yaml) runs the watcher
on that one URL, which triggers build-atlas once, exactly as the interval schedule would.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from typing import Any

from prefect.events import Event, emit_event

from lens_core.store import normalize_url

CHECKPOINT_CREATED = "lens.checkpoint.created"


def checkpoint_resource(url: str) -> dict[str, str]:
    """The event's resource: its id is the checkpoint URL (absolute, with a protocol)."""
    url = normalize_url(url)
    return {
        "prefect.resource.id": url,
        "prefect.resource.name": posixpath.basename(url),
        "lens.checkpoint.url": url,
    }


def emit_checkpoint_created(
    url: str, payload: dict[str, Any] | None = None, strict: bool = True
) -> Event | None:
    """Emit `lens.checkpoint.created` for `url`; `payload` carries free-form facts (epoch, metrics).

    With `strict`, raise when Prefect sends no events (no PREFECT_API_URL): the trigger would
    never fire.
    """
    event = emit_event(CHECKPOINT_CREATED, resource=checkpoint_resource(url), payload=payload or {})
    if event is None and strict:
        raise RuntimeError(
            "Prefect did not send the event: set PREFECT_API_URL to the server "
            "(e.g. http://127.0.0.1:4200/api)"
        )
    return event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.events", description=f"emit {CHECKPOINT_CREATED} for checkpoint URLs"
    )
    parser.add_argument("urls", nargs="+", help="checkpoint URLs (local path, file:// or s3://)")
    parser.add_argument("--payload", default="{}", help="JSON object attached to each event")
    args = parser.parse_args(argv)
    from prefect.events.worker import EventsWorker

    try:
        for url in args.urls:
            event = emit_checkpoint_created(url, json.loads(args.payload))
            print(f"{CHECKPOINT_CREATED} {event.resource.id} (event {event.id})")
    except (RuntimeError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        EventsWorker.drain_all()  # the events go out before the process exits
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
