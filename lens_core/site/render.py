"""Page rendering: Jinja2 templates (autoescaped) over the normalized site data."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from .charts import PALETTE_SIZE, cluster_chart, layout_chart, line_chart

HERE = Path(__file__).parent
# the site's own files, by the name templates use: published as assets/<stem>.<hash10>.<ext>
STATIC_FILES = {"css": "lens.css", "js": "lens.js", "icon": "favicon.svg"}
# the names earlier versions published them under: still reserved (old cached pages link them)
LEGACY_STATIC = frozenset({"assets/lens.css", "assets/lens.js", "assets/favicon.svg"})
STRIP = 6  # crops shown before "all crops" is clicked
CLASS_PREFIX = "../../"

_JS_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def json_for_html(obj: Any) -> str:
    """Compact JSON safe inside <script> (no '</script>', '<!--', '&' or line separators)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.translate(_JS_ESCAPES)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


def pct_of(fraction: float | None) -> str:
    """A fraction (0.25) as a whole percent ("25%")."""
    return "–" if fraction is None else f"{100 * fraction:.0f}%"


def num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def concept_labels(cls: dict) -> list[str]:
    """The labels people gave the class's concepts (searchable: "stem" finds every such class)."""
    return [c["label"] for c in cls["concepts"] if c.get("label")]


def search_key(cls: dict) -> str:
    """What the search matches: lowercase name + synonyms + id + concept labels.

    Plus an accent-free copy, so that a query typed without accents still matches.
    """
    text = " ".join([cls["name"], *cls["synonyms"], cls["id"], *concept_labels(cls)]).lower()
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return text if plain == text else f"{plain} {text}"


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=StrictUndefined,
    )
    env.filters.update(
        pct=pct, pct_of=pct_of, num=num, json_html=lambda o: Markup(json_for_html(o))
    )
    return env


def static_name(filename: str, data: bytes) -> str:
    """Content-addressed publish path of a static file: `assets/<stem>.<sha256[:10]>.<ext>`."""
    stem, ext = filename.rsplit(".", 1)
    return f"assets/{stem}.{hashlib.sha256(data).hexdigest()[:10]}.{ext}"


@lru_cache(maxsize=1)
def _static() -> dict[str, tuple[str, bytes]]:
    """Template name -> (hashed publish path, bytes), read once so that names and bytes agree."""
    out = {}
    for kind, name in STATIC_FILES.items():
        data = (HERE / "static" / name).read_bytes()
        out[kind] = (static_name(name, data), data)
    return out


def static_paths() -> dict[str, str]:
    """Template name ('css', 'js', 'icon') -> the content-addressed path the pages link."""
    return {kind: path for kind, (path, _) in _static().items()}


def static_files() -> dict[str, bytes]:
    """The site's own CSS, JS and icon, keyed by their content-addressed publish paths."""
    return {path: data for path, data in _static().values()}


def reserved_paths() -> frozenset[str]:
    """Publish paths no site asset may take: the static files' names, current and earlier."""
    return frozenset(static_files()) | LEGACY_STATIC


def immutable_paths() -> frozenset[str]:
    """Publish paths whose bytes never change under that name (a cache may keep them forever)."""
    return frozenset(static_paths().values())


def thumb(cls: dict) -> str | None:
    """Index thumbnail: the class's own, else its top concept's plain (or RGBA) visualization."""
    if cls["thumb"]:
        return cls["thumb"]
    top = cls["concepts"][0] if cls["concepts"] else None
    return (top["viz_plain"] or top["viz"]) if top else None


def _shown(cls: dict, concept: dict) -> float | None:
    """The percentage a concept shows: its logit share, or its Sobol share on a Sobol class."""
    return concept["sobol_share"] if cls["importance_basis"] == "sobol" else concept["logit_share"]


def class_list(data: dict) -> list[dict]:
    """data/classes.json: one small record per class, in label order."""
    out = []
    for c in data["classes"]:
        if c["status"] == "pending":  # no page yet: the search and "random class" never go there
            continue
        top = c["concepts"][0] if c["concepts"] else None
        out.append(
            {
                "index": c["index"],
                "id": c["id"],
                "slug": c["slug"],
                "name": c["name"],
                "synonyms": c["synonyms"],
                "labels": concept_labels(c),
                "changed": bool(c["changes"] and c["changes"]["marked"]),
                "status": c["status"],
                "thumb": thumb(c),
                "viz": top["viz"] if top else None,
                "top_concept": top["id"] if top else None,
                "top_share": _shown(c, top) if top else None,
                "importance_basis": c["importance_basis"],
                "flag": c["flag"],
                "n_concepts": len(c["concepts"]),
            }
        )
    return out


def _page(template: str, data: dict, r: str, **ctx: Any) -> str:
    ctx.setdefault("changes", data.get("changes"))
    ctx.setdefault("mistakes", data.get("mistakes"))
    return (
        environment()
        .get_template(template)
        .render(run=data["run"], r=r, static=static_paths(), **ctx)
    )


def render_index(data: dict) -> str:
    classes = data["classes"]
    cards = [
        {
            "slug": c["slug"],
            "name": c["name"],
            "q": search_key(c),
            "thumb": thumb(c),
            "failed": c["status"] == "failed",
            "pending": c["status"] == "pending",
            "flag": c["flag"],
            "changed": bool(c["changes"] and c["changes"]["marked"]),
        }
        for c in classes
    ]
    n_failed = sum(c["status"] == "failed" for c in classes)
    n_pending = sum(c["status"] == "pending" for c in classes)
    n_concepts = sum(len(c["concepts"]) for c in classes if c["status"] == "ok")
    return _page(
        "index.html",
        data,
        "",
        slug=None,
        cards=cards,
        n_failed=n_failed,
        n_concepts=n_concepts,
        n_pending=n_pending,
    )


def render_changes(data: dict) -> str:
    """changes.html: the classes ranked by how much they changed since the previous checkpoint."""
    return _page("changes.html", data, "", slug=None)


def render_mistakes(data: dict) -> str:
    """mistakes.html: the class pairs the model confuses, most images first, with their concepts."""
    known = {c["slug"] for c in data["classes"] if c["status"] == "ok"}
    return _page("mistakes.html", data, "", slug=None, known=known)


def render_method(data: dict) -> str:
    config = json.dumps(data["run"]["config"], indent=2, sort_keys=True, default=str)
    return _page("method.html", data, "", slug=None, config_json=config)


def render_class(data: dict, i: int, known: set[str], max_concepts: int = 10) -> str:
    """One class page; `known` is the set of slugs on the site (links to others only go there,
    previous/next included: the nearest class with a page on each side)."""
    classes = data["classes"]
    cls = classes[i]
    prev = next((classes[j] for j in range(i - 1, -1, -1) if classes[j]["slug"] in known), None)
    nxt = next(
        (classes[j] for j in range(i + 1, len(classes)) if classes[j]["slug"] in known), None
    )
    top = cls["concepts"][:max_concepts]
    colour = {c["id"]: j for j, c in enumerate(top) if j < PALETTE_SIZE}
    shares = {c["id"]: _shown(cls, c) for c in cls["concepts"]}
    fid = cls["fidelity"]
    pairs = data["mistakes"]["pairs"] if data.get("mistakes") else []
    ctx = {
        "slug": cls["slug"],
        "c": cls,
        "top": top,
        "colour": colour,
        "known": known,
        "strip": STRIP,
        "prev": prev,
        "next": nxt,
        "cluster": cluster_chart(cls["cluster"]["points"], colour, CLASS_PREFIX)
        if cls["cluster"]["points"]
        else None,
        "layout": layout_chart(cls["concept_layout"], shares, colour)
        if cls["concept_layout"]
        else None,
        "fidelity": fid,
        "fid_chart": line_chart(fid["curve"], fid["random_curve"])
        if fid and fid["curve"]
        else None,
        "name_by_slug": {c["slug"]: c["name"] for c in classes},
        "mistaken_for": [m for m in pairs if m["predicted"] == cls["slug"]],
        "went": [m for m in pairs if m["true"] == cls["slug"]],
    }
    return _page("class.html", data, CLASS_PREFIX, **ctx)


def class_json(data: dict, i: int) -> bytes:
    """data/<slug>.json: the normalized class entry (concepts sorted by importance) + run id."""
    return json.dumps(
        {"run_id": data["run"]["run_id"], **data["classes"][i]},
        ensure_ascii=False,
        separators=(",", ":"),
        allow_nan=False,
    ).encode()
