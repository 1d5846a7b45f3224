"""The `watch-checkpoints` flow: trigger `build-atlas` once for every checkpoint without a finished
run.

The Prefect server is the lock: every trigger carries an idempotency key derived from the run id
(the server keeps one flow run per flow and key), so overlapping watcher runs - the interval
schedule, a `lens.checkpoint.created` event, a manual run - create one `build-atlas` run.
"""

from __future__ import annotations

import json
import posixpath
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterTags,
)
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run as current_flow_run

from flows.forms import FormClasses, FormConfig, FormText, given
from lens_core import layout
from lens_core.config import AtlasConfig, config_from_parameters, inline_fields
from lens_core.identity import compute_run_id, planned_data_url
from lens_core.models import CheckpointError, checkpoint_digest
from lens_core.store import RunStore, filesystem, join_url, normalize_url

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".ckpt")
BUILD_DEPLOYMENT = "build-atlas/build-atlas"
RUN_TAG = "lens-run:"  # + run id: finds every build-atlas flow run of one LENS run
_PLACEHOLDER = re.compile(r"\{\{\s*\$?([\w.]+)\s*\}\}")


def planned_run_id(config: AtlasConfig, digest: str) -> str:
    """The run id `build_atlas` will compute for this config (its checkpoint has `digest`)."""
    return compute_run_id(digest, planned_data_url(config), config)


def is_checkpoint(url: str) -> bool:
    return url.lower().endswith(CHECKPOINT_SUFFIXES)


def _fingerprint(info: dict[str, Any]) -> str:
    """Size and version of a file: ETag on S3, mtime on disk; a rewritten checkpoint changes it."""
    version = (
        info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    )
    return f"{info.get('size')}:{version}"


def find_checkpoints(prefix: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """{checkpoint URL: fingerprint} under a prefix (recursively), or for the one it names."""
    url = normalize_url(prefix)
    fs, path = filesystem(url, storage_options)
    try:
        if is_checkpoint(url):
            return {url: _fingerprint(fs.info(path))}
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {
        fs.unstrip_protocol(p): _fingerprint(info)
        for p, info in sorted(found.items())
        if is_checkpoint(p)
    }


def list_checkpoints(prefix: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Checkpoint URLs under a prefix (recursively), or the prefix itself when it names one."""
    return sorted(find_checkpoints(prefix, storage_options))


class DigestCache:
    """Checkpoint digests by URL and fingerprint in `<store>/watch/digests.json`.

    Why: the schedule lists the prefix every few minutes; a checkpoint is read whole only when it
    is new or rewritten, not on every tick. Losing the file (or a race between watchers) only
    costs re-reading.
    """

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.path = filesystem(
            join_url(normalize_url(store_url), layout.WATCH_DIGESTS), storage_options
        )
        try:
            self.entries: dict[str, dict[str, str]] = json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(
        self, url: str, fingerprint: str, storage_options: dict[str, Any] | None = None
    ) -> str:
        hit = self.entries.get(url)
        if hit and hit.get("fingerprint") == fingerprint:
            return hit["digest"]
        digest = checkpoint_digest(url, storage_options)
        self.entries[url] = {"fingerprint": fingerprint, "digest": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            if "file" in self.fs.protocol:
                self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
            self.fs.pipe_file(
                self.path, json.dumps(self.entries, indent=1, sort_keys=True).encode()
            )


def is_finished(config: AtlasConfig, run_id: str) -> bool:
    """True when build_atlas wrote `<store>/runs/<run_id>/finished.json` (every class succeeded)."""
    return RunStore(config.store, run_id, config.storage_options).exists(layout.FINISHED)


def idempotency_key(run_id: str, attempt: int) -> str:
    """One flow run per (run id, attempt): the server refuses a second run with the same key."""
    return f"lens-build-atlas/{run_id}/{attempt}"


@dataclass
class Trigger:
    """What the watcher did for one checkpoint."""

    checkpoint: str
    run_id: str
    action: str  # finished | triggered | existing | gave-up | error
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    attempt: int = 0
    message: str = ""


def _previous_runs(deployment_id: Any, run_id: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        flt = FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            tags=FlowRunFilterTags(all_=[RUN_TAG + run_id]),
        )
        return client.read_flow_runs(flow_run_filter=flt, limit=200)


def request_build(
    deployment: str,
    checkpoint: str,
    run_id: str,
    parameters: dict[str, Any],
    config: AtlasConfig,
    max_attempts: int = 3,
    marker: str | None = None,
) -> Trigger:
    """Create the build-atlas flow run for `run_id` unless one is pending, running or finished.

    The attempt number counts earlier runs of this run id that ended without `finished.json`;
    watchers that race compute the same number, hence the same key, hence one flow run.
    """
    with get_client(sync_client=True) as client:
        try:
            deployment_id = client.read_deployment_by_name(deployment).id
        except ObjectNotFound:
            raise ValueError(
                f"deployment {deployment!r} not found: apply deploy/prefect.yaml (docs/deploy.md)"
            ) from None
    previous = _previous_runs(deployment_id, run_id)
    ended = [r for r in previous if r.state is not None and r.state.is_final()]
    if ended and is_finished(config, run_id):  # a run finished between the first check and now
        return Trigger(checkpoint, run_id, "finished")
    attempt = len(ended)
    if attempt >= max_attempts:
        return Trigger(
            checkpoint,
            run_id,
            "gave-up",
            attempt=attempt,
            message=(
                f"{attempt} runs ended without finishing; "
                f"not retrying (max_attempts={max_attempts})"
            ),
        )
    marker = marker or f"lens-trigger:{uuid.uuid4().hex[:8]}"
    fr = run_deployment(
        deployment,
        parameters=parameters,
        timeout=0,
        as_subflow=False,
        idempotency_key=idempotency_key(run_id, attempt),
        flow_run_name=f"atlas-{run_id}-{attempt}",
        tags=["lens", RUN_TAG + run_id, marker],
    )
    created = marker in (fr.tags or [])
    return Trigger(
        checkpoint, run_id, "triggered" if created else "existing", str(fr.id), fr.name, attempt
    )


def check_prefix(prefix: str | None) -> str:
    """The prefix to list; empty means LENS_CHECKPOINTS was unset at `prefect deploy` (it becomes
    "")."""
    if not prefix or not prefix.strip() or _PLACEHOLDER.search(prefix):
        raise ValueError(
            f"no checkpoint prefix ({prefix!r}): set LENS_CHECKPOINTS in the environment of "
            "`prefect deploy` (docs/deploy.md) or pass the prefix parameter"
        )
    return prefix.strip()


@flow(name="watch-checkpoints", log_prints=True, persist_result=False)
def watch_checkpoints(
    prefix: str,
    config_path: FormText = None,
    config: FormConfig = None,
    classes: FormClasses = None,
    store: FormText = None,
    publish: FormText = None,
    deployment: str = BUILD_DEPLOYMENT,
    max_attempts: int = 3,
) -> dict[str, Any]:
    """Trigger build-atlas once for every checkpoint under a prefix that has no finished run.

    Args:
        prefix: folder URL (local, `file://` or `s3://`) listed recursively for `*.pt`, `*.pth`,
            `*.safetensors`, `*.ckpt`; or the URL of one checkpoint (what the event trigger passes).
        config_path: a TOML AtlasConfig file (local path) for the runs; empty = the toy default.
        config: AtlasConfig fields for the runs. With `config_path` too, the file is the base and
            a field here wins only where it differs from the default shown.
        classes: restrict the runs to these class ids/names/slugs.
        store: run store URL (fsspec), e.g. s3://bucket/lens.
        publish: site URL (fsspec), e.g. s3://bucket/site.
        deployment: the build-atlas deployment to trigger, as "flow name/deployment name".
        max_attempts: build-atlas runs per checkpoint that may end unfinished before giving up.
    """
    logger = get_run_logger()
    prefix = check_prefix(prefix)
    config_path, classes, store, publish = (
        given(v) for v in (config_path, classes, store, publish)
    )
    base = config_from_parameters(config_path, config, None, classes, store, publish)
    marker = f"lens-trigger:{(current_flow_run.get_id() or uuid.uuid4().hex)[:8]}"
    digests = DigestCache(base.store, base.storage_options)
    results: list[Trigger] = []
    for ckpt, fingerprint in find_checkpoints(prefix, base.storage_options).items():
        try:
            digest = digests.digest(ckpt, fingerprint, base.storage_options)
        except CheckpointError as err:
            logger.warning("skipping %s: %s", ckpt, err)
            results.append(Trigger(ckpt, "", "error", message=str(err)))
            continue
        params = {
            "config_path": config_path,
            "config": inline_fields(config) or None,
            "checkpoint": ckpt,
            "classes": classes,
            "store": store,
            "publish": publish,
        }
        cfg = config_from_parameters(**params)
        run_id = planned_run_id(cfg, digest)
        if is_finished(cfg, run_id):
            results.append(Trigger(ckpt, run_id, "finished"))
            continue
        t = request_build(deployment, ckpt, run_id, params, cfg, max_attempts, marker)
        logger.info("%s: run %s %s %s", ckpt, run_id, t.action, t.flow_run_name or t.message)
        results.append(t)
    digests.save()
    counts = {
        a: sum(t.action == a for t in results)
        for a in ("finished", "triggered", "existing", "gave-up", "error")
    }
    logger.info("%d checkpoints under %s: %s", len(results), prefix, counts)
    return {"prefix": prefix, "counts": counts, "checkpoints": [asdict(t) for t in results]}


if __name__ == "__main__":
    import sys

    print(
        watch_checkpoints(
            prefix=sys.argv[1], config_path=(sys.argv[2] if len(sys.argv) > 2 else None)
        )
    )
