"""The site data, described once: pydantic models that validate, fill defaults and document it.

`normalize_site` checks everything before anything is written (safe slugs and paths, finite
numbers, known states), so a bad class never leaves half a site. SCHEMA.md is generated from
these models (`schema_markdown()`, see `scripts/site-schema.sh`; a test keeps the file current).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from lens_core.secrets import mask_secrets, public_options

SLUG_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # every pattern here is matched whole (fullmatch)
PATH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
MAX_SLUG = 120
STATIC_RE = re.compile(  # the site's own files
    r"assets/(lens(\.[^/]*)?\.(css|js)|favicon(\.[^/]*)?\.svg)"
)


class SiteError(ValueError):
    """The site data is malformed or unsafe (bad slug, path escaping the publish root, ...)."""


def check_slug(slug: Any, where: str = "slug") -> str:
    """A slug is [a-z0-9] words joined by single dashes: never '/', '.', '..' or markup."""
    if not isinstance(slug, str) or len(slug) > MAX_SLUG or not SLUG_RE.fullmatch(slug):
        raise SiteError(f"unsafe {where}: {slug!r} (only [a-z0-9-] allowed)")
    return slug


def check_path(path: Any, where: str = "path") -> str:
    """A publish-relative path: no scheme, no leading '/', no '.'/'..' segment, plain characters."""
    if not isinstance(path, str) or len(path) > 512 or not PATH_RE.fullmatch(path):
        raise SiteError(f"unsafe {where}: {path!r} (must be a plain publish-relative path)")
    return path


def check_asset_path(path: Any) -> str:
    """An asset key lives under assets/ and must not overwrite the site's own CSS/JS/icon."""
    check_path(path, "asset path")
    if not path.startswith("assets/") or STATIC_RE.fullmatch(path):
        raise SiteError(
            f"asset path {path!r} must be under assets/ and not one of the site's own files"
        )
    return path


# ---- field types ---------------------------------------------------------------------------


def _slug(v: Any) -> str:
    return check_slug(v)


def _path(v: Any) -> str | None:
    return None if v in (None, "") else check_path(v)


def _number(v: Any) -> float | None:
    """A finite float (numpy scalars too); None for missing, NaN or inf (JSON has no NaN)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"expected a number, got {v!r}")
    v = float(v)
    return v if math.isfinite(v) else None


def _integer(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"expected an integer, got {v!r}")
    return int(v)


def _text(v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _run_id(v: Any) -> str:
    from lens_core.identity import is_run_id

    if not is_run_id(v):
        raise ValueError(f"not a run id: {v!r}")
    return v


def _zero(v: Any) -> float:
    n = _number(v)
    return 0.0 if n is None else n


Slug = Annotated[str, BeforeValidator(_slug)]
Path = Annotated[str | None, BeforeValidator(_path)]
Number = Annotated[float | None, BeforeValidator(_number)]
Coordinate = Annotated[float, BeforeValidator(_zero)]
Integer = Annotated[int | None, BeforeValidator(_integer)]
Text = Annotated[str, BeforeValidator(_text)]
RunId = Annotated[str, BeforeValidator(_run_id)]
OptText = Annotated[str | None, BeforeValidator(lambda v: None if v in (None, "") else _text(v))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class Similar(_Model):
    """A nearest concept in another class; linked to classes/<slug>/index.html#concept-<concept>."""

    slug: Slug
    name: Text = ""
    concept: Integer = None
    similarity: Number = None


class Aligned(_Model):
    """A class whose classifier weights align with the concept (cosine)."""

    slug: Slug
    name: Text = ""
    score: Number = None


class ConceptChange(_Model):
    """A concept's change since the last checkpoint: new, or importance up/down/same (points)."""

    kind: Literal["new", "up", "down", "same"]
    delta: Number = Field(None, description="importance now minus before, in percentage points")
    before: Integer = Field(None, description="the matched concept's id in the previous run")
    similarity: Number = None


class ConceptBias(_Model):
    """How many mistaken images of how many other classes a concept is the top concept of."""

    images: int = 0
    classes: int = 0
    pairs: list[Slug] = Field(
        default_factory=list, description="the true classes of those images, most first"
    )


class Concept(_Model):
    """One concept of a class page (anchor #concept-<id>)."""

    id: Annotated[int, BeforeValidator(_integer)]
    rank: Integer = Field(None, description="rank by importance (1 = first); tie-break only")
    color: str | None = Field(None, description="its colour on maps and charts (by rank)")
    logit_share: Number = Field(
        None,
        description="percent of the summed class logit over the images classified as the class; "
        "negative = argues against the class",
    )
    sobol: Number = Field(None, description="Sobol total index")
    sobol_share: Number = Field(
        None,
        description="percent of the class's summed Sobol total indices "
        "(shown when there is no logit share)",
    )
    important: bool = False
    n_top_images: Integer = None
    viz: Path = Field(None, description="MACO image with its transparency map as alpha (RGBA PNG)")
    viz_plain: Path = Field(
        None, description="the same without alpha; shown by default, `viz` on toggle"
    )
    viz_pending: bool = Field(
        False,
        description="while the run goes on: the render is still to come (the page "
        "shows 'rendering')",
    )
    crops: list[Annotated[str, BeforeValidator(lambda v: check_path(v))]] = Field(
        default_factory=list, description="top-activating crops"
    )
    similar: list[Similar] = Field(default_factory=list)
    aligned_classes: list[Aligned] = Field(default_factory=list)
    label: OptText = Field(
        None, description="the name people gave the concept (shown instead of 'concept 3')"
    )
    label_source: Literal["user", "carried"] | None = None
    label_from: OptText = Field(None, description="where a carried label came from")
    change: ConceptChange | None = None
    bias: ConceptBias | None = Field(
        None,
        description="a bias candidate: the concept carries most of the "
        "mistaken logit for images of several other classes",
    )


class Point(_Model):
    """A dot of the strategic cluster graph: an image the model assigns to the class."""

    x: Coordinate = 0.0
    y: Coordinate = 0.0
    concept: Integer = None
    rank: Integer = None
    image: Path = None


class Cluster(_Model):
    points: list[Point] = Field(default_factory=list)


class LayoutPoint(_Model):
    """A concept on the concept-similarity map (any scale)."""

    concept: Annotated[int, BeforeValidator(_integer)]
    rank: Integer = None
    x: Coordinate = 0.0
    y: Coordinate = 0.0


class OverlayConcept(_Model):
    """A concept that dominates part of an attribution overlay (its legend)."""

    concept: Annotated[int, BeforeValidator(_integer)]
    rank: Integer = None
    share: Number = None


class Attribution(_Model):
    """An example image, plain and under its concept-coloured overlay."""

    image: Path = None
    heatmap: Path = None
    caption: Text = ""
    concepts: list[OverlayConcept] = Field(default_factory=list)


class Fidelity(_Model):
    """Deletion curves: the class score after removing 0..k concepts, by importance vs random."""

    curve: list[Coordinate] = Field(default_factory=list)
    random_curve: list[Coordinate] = Field(default_factory=list)
    auc: Number = None
    random_auc: Number = None


class Vanished(_Model):
    """A concept of the previous run that no concept of this run matches."""

    concept: Annotated[int, BeforeValidator(_integer)]
    importance: Number = None
    label: OptText = None


class ClassChanges(_Model):
    """What changed in a class since the previous checkpoint (lens_core.changes)."""

    score: Number = None
    rank: Integer = None
    marked: bool = False
    previous_run: RunId
    previous_label: Text = ""
    prev_slug: Slug
    vanished: list[Vanished] = Field(default_factory=list)
    carried_labels: int = 0
    logit_change: Number = None
    accuracy_before: Number = None
    accuracy_after: Number = None
    previous_page: bool = Field(
        False,
        description="the previous run's page of the class is published beside this "
        "site (links go there only then)",
    )


class ClassEntry(_Model):
    """One class: its page, its data file, its tile on the index."""

    index: Annotated[int, BeforeValidator(_integer)]
    id: Text = ""
    name: Annotated[str, BeforeValidator(lambda v: _text(v) if v is not None else v)]
    slug: Slug
    synonyms: list[Annotated[str, BeforeValidator(_text)]] = Field(default_factory=list)
    status: Literal["ok", "failed", "pending"] = Field(
        "ok",
        description="pending: still running (a partial site; no page yet, so nothing links to it)",
    )
    error: str | None = None
    n_images: Integer = None
    n_patches: Integer = None
    skipped_images: Integer = None
    assigned_images: Integer = Field(
        None, description="of the class's images, how many the model classifies as the class"
    )
    assigned_patches: Integer = Field(None, description="the same for patches")
    importance_basis: Literal["logit_share", "sobol"] | None = Field(
        None, description="what the percentages are"
    )
    share_residual: Number = Field(
        None,
        description="with a logit share: the percent of the summed class logit "
        "that the concepts do not reconstruct",
    )
    share_bias: Number = Field(
        None,
        description="with a logit share: the head's bias, in percent of the summed class logit",
    )
    note: str | None = Field(
        None, description="why the percentages are Sobol-based, or another finding"
    )
    flag: str | None = Field(
        None, description="a finding flagged on the index, e.g. rarely-predicted"
    )
    thumb: Path = None
    concepts: list[Concept] = Field(default_factory=list, description="sorted by importance")
    cluster: Cluster = Field(default_factory=Cluster)
    concept_layout: list[LayoutPoint] = Field(default_factory=list)
    attributions: list[Attribution] = Field(default_factory=list)
    fidelity: Fidelity | None = None
    changes: ClassChanges | None = None

    @model_validator(mode="after")
    def _sorted(self) -> ClassEntry:
        sobol_basis = self.importance_basis == "sobol"

        def key(c: Concept) -> tuple:
            score = c.sobol_share if sobol_basis else c.logit_share
            return (
                -(score if score is not None else -math.inf),
                c.rank if c.rank is not None else 1 << 30,
                c.id,
            )

        self.concepts.sort(key=key)
        if self.error == "":
            self.error = None
        return self


def _mask_config(config: Any) -> Any:
    """The run config as shown on the method page: allow-listed storage options, secrets masked."""
    if not isinstance(config, dict):
        return {}
    out = dict(config)
    if isinstance(out.get("storage_options"), dict):
        out["storage_options"] = public_options(out["storage_options"])
    return mask_secrets(out)


class Run(_Model):
    """The run a site shows."""

    run_id: Annotated[str, BeforeValidator(lambda v: _text(v) if v is not None else v)]
    title: Annotated[str, BeforeValidator(lambda v: _text(v) or "LENS atlas")] = "LENS atlas"
    model: Annotated[str, BeforeValidator(lambda v: "" if v is None else str(v))] = ""
    checkpoint_digest: Annotated[str, BeforeValidator(lambda v: "" if v is None else str(v))] = ""
    layer: Annotated[str, BeforeValidator(lambda v: "" if v is None else str(v))] = ""
    data_url: Annotated[str, BeforeValidator(lambda v: "" if v is None else str(v))] = ""
    created: Annotated[str, BeforeValidator(lambda v: "" if v is None else str(v))] = ""
    n_concepts: Integer = None
    config: Annotated[dict[str, Any], BeforeValidator(_mask_config)] = Field(default_factory=dict)


class ChangedConcept(_Model):
    """A top concept on the changes page (`before`: the previous run's, with paths in its site)."""

    id: Annotated[int, BeforeValidator(_integer)]
    label: OptText = None
    viz: Path = None
    crops: list[Annotated[str, BeforeValidator(lambda v: check_path(v))]] = Field(
        default_factory=list
    )
    shown: Number = None


class ChangedClass(_Model):
    """A class on the changes page, most changed first."""

    slug: Slug
    name: Text = ""
    score: Number = None
    appeared: int = 0
    vanished: int = 0
    matched: int = 0
    marked: bool = False
    prev_slug: Slug
    logit_change: Number = None
    before: list[ChangedConcept] | None = None
    after: list[ChangedConcept] = Field(default_factory=list)


class NotComparable(_Model):
    """A class that could not be compared with the previous run (its images changed), and why."""

    slug: Slug
    name: Text = ""
    reason: Text = ""


class SiteChanges(_Model):
    """The comparison with the previous checkpoint's run (the changes page)."""

    previous_run: RunId
    previous_label: Text = ""
    previous_site: bool = Field(
        False, description="the previous run's site is published beside this one"
    )
    threshold: Number = None
    ranking: list[ChangedClass] = Field(default_factory=list)
    not_comparable: list[NotComparable] = Field(default_factory=list)


class MistakeConcept(_Model):
    """A concept of the predicted class in a mistake's explanation."""

    concept: Annotated[int, BeforeValidator(_integer)]
    share: Number = Field(
        None, description="percent of the mistaken logit (or of the summed Sobol indices)"
    )
    rank: Integer = Field(
        None, description="its rank on the predicted class's page (0 = first): its colour"
    )
    label: OptText = None


class MistakeExample(_Model):
    """A mistaken image, with the overlay of the predicted class's concepts."""

    overlay: Path = None
    plain: Path = None
    concepts: list[OverlayConcept] = Field(default_factory=list)


class MistakePair(_Model):
    """Images of class `true` that the model assigns to class `predicted`, and why."""

    true: Slug
    true_name: Text = ""
    predicted: Slug | None = Field(
        None, description="None when the predicted class is not in this run"
    )
    predicted_name: Text = ""
    images: int = 0
    basis: Literal["logit_share", "sobol"] | None = None
    note: OptText = None
    residual: Number = None
    bias: Number = None
    concepts: list[MistakeConcept] = Field(default_factory=list, description="largest share first")
    examples: list[MistakeExample] = Field(default_factory=list)


class SiteMistakes(_Model):
    """The mistakes page: pairs of classes ranked by how many images the model confuses."""

    mistaken: int = 0
    n_images: int = 0
    pairs: list[MistakePair] = Field(default_factory=list)


class Site(_Model):
    """The whole site: a run and its classes in label order (previous/next links follow it)."""

    run: Run
    classes: list[ClassEntry] = Field(default_factory=list)
    changes: SiteChanges | None = None
    mistakes: SiteMistakes | None = None

    @model_validator(mode="after")
    def _unique(self) -> Site:
        seen: set[str] = set()
        for c in self.classes:
            if c.slug in seen:
                raise ValueError(f"duplicate class slug {c.slug!r}")
            seen.add(c.slug)
        return self


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "site"


def normalize_site(site: Any) -> dict:
    """Checked copy of the site data, defaults filled, concepts sorted by importance.

    A SiteError names the field that is wrong.
    """
    if not isinstance(site, dict):
        raise SiteError("site: expected an object with 'run' and 'classes'")
    classes = site.get("classes")
    if isinstance(classes, list):  # a class's index defaults to its position
        site = {
            **site,
            "classes": [
                {"index": j, **e} if isinstance(e, dict) else e for j, e in enumerate(classes)
            ],
        }
    try:
        model = Site.model_validate(site)
    except ValidationError as err:
        first = err.errors()[0]
        msg = str(first.get("ctx", {}).get("error", first["msg"]))
        raise SiteError(f"{_where(first['loc'])}: {msg}") from None
    return model.model_dump()


def referenced_paths(cls: dict) -> list[str]:
    """Every image path a class page refers to (to report the ones no asset provides)."""
    out = [cls["thumb"]] if cls["thumb"] else []
    for c in cls["concepts"]:
        out += [p for p in (c["viz"], c["viz_plain"]) if p] + c["crops"]
    out += [p["image"] for p in cls["cluster"]["points"] if p["image"]]
    for a in cls["attributions"]:
        out += [p for p in (a["image"], a["heatmap"]) if p]
    return out


# ---- SCHEMA.md ------------------------------------------------------------------------------

_INTRO = """# Site data schema

Generated from the pydantic models in `lens_core/site/schema.py` by `scripts/site-schema.sh`;
do not edit by hand.

`build_site(site, publish_url, storage_options=None, assets=None, max_concepts=10)` takes plain,
JSON-able data (this file) and a mapping of image files, and writes the static site through fsspec.
Everything is validated before the first write: a bad slug or path raises `SiteError` and nothing
is written. Numbers may be Python or numpy scalars; NaN/inf become `null`. Slugs match
`^[a-z0-9]+(-[a-z0-9]+)*$` (at most 120 characters); paths are publish-relative
(`^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$`: no scheme, no leading `/`, no
`..`). `assets` maps such paths under `assets/` to bytes or loaders; they may not replace the
site's own CSS/JS/icon. The run's `config` is shown on the method page with only allow-listed
storage options, and anything that looks like a credential masked.
"""


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"Annotated\[([^,\]]+(?:\[[^\]]*\])?)[^\]]*\]", r"\1", text)
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return re.sub(r"\b(__main__|lens_core\.site\.schema)\.", "", text)


def schema_markdown() -> str:
    """SCHEMA.md: one table per model, from the models' fields and descriptions."""
    parts = [_INTRO]
    for model in (
        Site,
        Run,
        ClassEntry,
        Concept,
        ConceptChange,
        Similar,
        Aligned,
        Cluster,
        Point,
        LayoutPoint,
        Attribution,
        OverlayConcept,
        Fidelity,
        ClassChanges,
        Vanished,
        SiteChanges,
        ChangedClass,
        ChangedConcept,
        NotComparable,
        ConceptBias,
        SiteMistakes,
        MistakePair,
        MistakeConcept,
        MistakeExample,
    ):
        parts.append(f"\n## `{model.__name__}`\n\n{(model.__doc__ or '').strip()}\n")
        parts.append("| field | type | default | notes |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            default = (
                "required"
                if field.is_required()
                else repr(field.get_default(call_default_factory=True))
            )
            kind = _type_name(field.annotation).replace("|", "\\|")
            parts.append(
                f"| `{name}` | {kind} | {default.replace('|', chr(92) + '|')} | "
                f"{field.description or ''} |"
            )
    return "\n".join(parts) + "\n"
