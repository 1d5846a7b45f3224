"""The store layout of a run, in one place: paths, stage names, completion markers, run-id inputs.

Everything a run computes lives under ``<store>/runs/<run_id>/`` (docs/interfaces.md). Every other
module asks this one for a path instead of spelling it out, so the layout can change here alone.

Class identity. A class is its directory id and its label index (never its slug alone): the
activations stage records a fingerprint of what it was computed from (class dir, label index,
the sampled image list) in its completion marker, and every later stage of the class records the
same fingerprint. A marker whose fingerprint differs from the current one is not complete: the
stage is recomputed, never reused for another class.
"""

from __future__ import annotations

from lens_core.urls import join_url

# per-class stages, in chain order; "render" (MACO, pooled) and "publish" are run-wide
CLASS_STAGES: tuple[str, ...] = ("activations", "factorize", "importance", "crops")
STATUS_STAGES: tuple[str, ...] = (*CLASS_STAGES, "render")

# run-level files
RUN_JSON = "run.json"
FINISHED = (
    "finished.json"  # written by build-atlas when every class succeeded (read by the watcher)
)
ZARR_ROOT = "lens.zarr"
MAGNITUDE = "maco/magnitude.npy"
SIMILAR = "atlas/similar.json"
ALIGNMENT = "atlas/alignment.json"
CONFUSIONS = "atlas/confusions.json"  # mistakes explained by concepts (written last by its step)
LABELS = "labels.json"  # concept labels of this run (lens label)
CHANGES = "changes"  # changes/<previous run>/<class>.json, .../summary.json: what changed since it
CHANGES_LATEST = "changes/latest.json"  # which previous run the published changes are against
SUCCESS = "_SUCCESS"  # a file prefix's completion marker
RUNS = "runs"  # <store>/runs/<run_id>/
LOCKS = "locks"  # leases: locks/<stage>/<class>/<generation>.json
STATUS = "status"  # status/<class>/<stage>.json
WATCH_DIGESTS = "watch/digests.json"  # under <store>: the checkpoint watcher's digest cache


# ---- per-class paths (Zarr groups are relative to lens.zarr, files to the run root) --------


def acts(slug: str) -> str:
    """Zarr group of a class's activations: A, patches, logits, spatial maps."""
    return f"acts/{slug}"


def concepts(slug: str) -> str:
    """Zarr group of a class's concepts: U, W."""
    return f"concepts/{slug}"


def importance(slug: str) -> str:
    """Zarr group of a class's importance: sobol, logit_share, order, per-image importance."""
    return f"importance/{slug}"


def crops(slug: str) -> str:
    """File prefix of a class's crops, thumbnails and attribution maps (index.json inside)."""
    return f"crops/{slug}"


def crops_index(slug: str) -> str:
    return f"{crops(slug)}/index.json"


def crop_file(slug: str, name: str) -> str:
    return f"{crops(slug)}/{name}"


def viz(slug: str) -> str:
    """File prefix of a class's MACO renders."""
    return f"viz/{slug}"


def viz_file(slug: str, concept: int, ext: str) -> str:
    """A concept's render: .png (RGBA, alpha = transparency map) or .webp (plain)."""
    return f"{viz(slug)}/{concept}.{ext}"


def confusion_file(true_slug: str, predicted_slug: str, name: str) -> str:
    """An example image of a mistake (true class -> predicted class): overlay or plain image."""
    return f"confusions/{true_slug}/{predicted_slug}/{name}"


def status_dir(slug: str) -> str:
    return f"{STATUS}/{slug}"


def status_file(slug: str, stage: str) -> str:
    return f"{STATUS}/{slug}/{stage}.json"


def lease_prefix(name: str) -> str:
    """Where the generations of the lease `name` ('<stage>/<class>') live."""
    return f"{LOCKS}/{name.strip('/')}"


def run_root(store_url: str, run_id: str) -> str:
    """`<store>/runs/<run_id>`: everything one run computes."""
    return join_url(store_url, RUNS, run_id)


def lock(stage: str, slug: str) -> str:
    """Lease name of one (stage, class): `locks/<stage>/<class>/` in the store."""
    return f"{stage}/{slug}"


def changes_file(previous: str, slug: str) -> str:
    """A class's change report against the run `previous`."""
    return f"{CHANGES}/{previous}/{slug}.json"


def changes_summary(previous: str) -> str:
    """The ranking of every class's change against the run `previous`."""
    return f"{CHANGES}/{previous}/summary.json"


def stage_group(stage: str, slug: str) -> str:
    """Where a per-class stage's completion marker lives (a Zarr group, or a file prefix)."""
    return {"activations": acts, "factorize": concepts, "importance": importance, "crops": crops}[
        stage
    ](slug)


FILE_STAGES = frozenset({"crops"})  # marked by a _SUCCESS object; the others by a Zarr attribute
