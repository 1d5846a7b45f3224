"""Validation of the site data (SCHEMA.md): safe slugs and paths, defaults, finite numbers.

Everything is checked before anything is written, so a bad class never leaves half a site.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
MAX_SLUG = 120
STATIC = ("assets/lens.css", "assets/lens.js", "assets/favicon.svg")
SECRET_RE = re.compile(r"secret|passw|token|credential|(^|_)key($|_)|access_key", re.IGNORECASE)
RUN_FIELDS = ("model", "checkpoint_digest", "layer", "data_url", "created")


class SiteError(ValueError):
    """The site data is malformed or unsafe (bad slug, path escaping the publish root, ...)."""


def check_slug(slug: Any, where: str = "slug") -> str:
    """A slug is [a-z0-9] words joined by single dashes: never '/', '.', '..' or markup."""
    if not isinstance(slug, str) or len(slug) > MAX_SLUG or not SLUG_RE.match(slug):
        raise SiteError(f"unsafe {where}: {slug!r} (only [a-z0-9-] allowed)")
    return slug


def check_path(path: Any, where: str = "path") -> str:
    """A publish-relative path: no scheme, no leading '/', no '.'/'..' segments, plain characters."""
    if not isinstance(path, str) or len(path) > 512 or not PATH_RE.match(path):
        raise SiteError(f"unsafe {where}: {path!r} (must be a plain publish-relative path)")
    return path


def check_asset_path(path: Any) -> str:
    """An asset key lives under assets/ and must not overwrite the site's own CSS/JS."""
    check_path(path, "asset path")
    if not path.startswith("assets/") or path in STATIC:
        raise SiteError(f"asset path {path!r} must be under assets/ and not one of {STATIC}")
    return path


def _num(value: Any, where: str, default: float | None = None) -> float | None:
    """A finite float (numpy scalars too), or `default` for missing/NaN/inf (JSON has no NaN)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SiteError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    return value if math.isfinite(value) else default


def _int(value: Any, where: str, required: bool = False) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SiteError(f"{where}: expected an integer, got {value!r}")
    return int(value)


def _str(value: Any, where: str, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise SiteError(f"{where}: expected a string, got {value!r}")
    return value


def _opt_path(value: Any, where: str) -> str | None:
    return None if value in (None, "") else check_path(value, where)


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise SiteError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


def _obj(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SiteError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _objs(value: Any, where: str) -> list[dict]:
    return [_obj(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where))]


def redact(config: Any) -> Any:
    """Config with secret-looking values replaced by '***' (a safety net: upstream redacts too)."""
    if isinstance(config, dict):
        return {
            k: "***" if SECRET_RE.search(str(k)) and v not in (None, "") else redact(v)
            for k, v in config.items()
        }
    if isinstance(config, list | tuple):
        return [redact(v) for v in config]
    return config


def _concept(c: Any, where: str) -> dict:
    c = _obj(c, where)
    share = _num(c.get("logit_share"), f"{where}.logit_share")
    return {
        "id": _int(c.get("id"), f"{where}.id", required=True),
        "rank": _int(c.get("rank"), f"{where}.rank"),
        "logit_share": share,
        "sobol": _num(c.get("sobol"), f"{where}.sobol"),
        "important": bool(c.get("important", False)),
        "n_top_images": _int(c.get("n_top_images"), f"{where}.n_top_images"),
        "viz": _opt_path(c.get("viz"), f"{where}.viz"),
        "viz_plain": _opt_path(c.get("viz_plain"), f"{where}.viz_plain"),
        "crops": [check_path(p, f"{where}.crops") for p in _list(c.get("crops"), f"{where}.crops")],
        "similar": [
            {
                "slug": check_slug(s.get("slug"), f"{where}.similar.slug"),
                "name": _str(s.get("name"), f"{where}.similar.name"),
                "concept": _int(s.get("concept"), f"{where}.similar.concept"),
                "similarity": _num(s.get("similarity"), f"{where}.similar.similarity"),
            }
            for s in _objs(c.get("similar"), f"{where}.similar")
        ],
        "aligned_classes": [
            {
                "slug": check_slug(a.get("slug"), f"{where}.aligned_classes.slug"),
                "name": _str(a.get("name"), f"{where}.aligned_classes.name"),
                "score": _num(a.get("score"), f"{where}.aligned_classes.score"),
            }
            for a in _objs(c.get("aligned_classes"), f"{where}.aligned_classes")
        ],
    }


def _importance_key(c: dict) -> tuple:
    share = c["logit_share"]
    return (
        -(share if share is not None else -math.inf),
        c["rank"] if c["rank"] is not None else 1 << 30,
        c["id"],
    )


def _class(e: Any, i: int) -> dict:
    where = f"classes[{i}]"
    e = _obj(e, where)
    status = e.get("status", "ok")
    if status not in ("ok", "failed"):
        raise SiteError(f"{where}.status: expected 'ok' or 'failed', got {status!r}")
    concepts = [
        _concept(c, f"{where}.concepts[{j}]")
        for j, c in enumerate(_list(e.get("concepts"), f"{where}.concepts"))
    ]
    concepts.sort(key=_importance_key)
    cluster = _obj(e.get("cluster"), f"{where}.cluster")
    points = [
        {
            "x": _num(p.get("x"), f"{where}.cluster.x", 0.0),
            "y": _num(p.get("y"), f"{where}.cluster.y", 0.0),
            "concept": _int(p.get("concept"), f"{where}.cluster.concept"),
            "image": _opt_path(p.get("image"), f"{where}.cluster.image"),
        }
        for p in _objs(cluster.get("points"), f"{where}.cluster.points")
    ]
    layout = [
        {
            "concept": _int(p.get("concept"), f"{where}.concept_layout.concept", required=True),
            "x": _num(p.get("x"), f"{where}.concept_layout.x", 0.0),
            "y": _num(p.get("y"), f"{where}.concept_layout.y", 0.0),
        }
        for p in _objs(e.get("concept_layout"), f"{where}.concept_layout")
    ]
    attributions = [
        {
            "image": _opt_path(a.get("image"), f"{where}.attributions.image"),
            "heatmap": _opt_path(a.get("heatmap"), f"{where}.attributions.heatmap"),
            "caption": _str(a.get("caption"), f"{where}.attributions.caption"),
        }
        for a in _objs(e.get("attributions"), f"{where}.attributions")
    ]
    fid = _obj(e.get("fidelity"), f"{where}.fidelity")
    fidelity = None
    if fid:
        fidelity = {
            "curve": [
                _num(v, f"{where}.fidelity.curve", 0.0)
                for v in _list(fid.get("curve"), f"{where}.fidelity.curve")
            ],
            "random_curve": [
                _num(v, f"{where}.fidelity.random_curve", 0.0)
                for v in _list(fid.get("random_curve"), f"{where}.fidelity.random_curve")
            ],
            "auc": _num(fid.get("auc"), f"{where}.fidelity.auc"),
            "random_auc": _num(fid.get("random_auc"), f"{where}.fidelity.random_auc"),
        }
    return {
        "index": _int(e.get("index", i), f"{where}.index", required=True),
        "id": _str(e.get("id"), f"{where}.id"),
        "name": _str(e.get("name"), f"{where}.name", required=True),
        "slug": check_slug(e.get("slug"), f"{where}.slug"),
        "synonyms": [
            _str(s, f"{where}.synonyms", required=True)
            for s in _list(e.get("synonyms"), f"{where}.synonyms")
        ],
        "status": status,
        "error": _str(e.get("error"), f"{where}.error") or None,
        "n_images": _int(e.get("n_images"), f"{where}.n_images"),
        "n_patches": _int(e.get("n_patches"), f"{where}.n_patches"),
        "thumb": _opt_path(e.get("thumb"), f"{where}.thumb"),
        "concepts": concepts,
        "cluster": {"points": points},
        "concept_layout": layout,
        "attributions": attributions,
        "fidelity": fidelity,
    }


def _run(run: Any) -> dict:
    if not isinstance(run, dict):
        raise SiteError("run: expected an object")
    out = {"run_id": _str(run.get("run_id"), "run.run_id", required=True)}
    for key in RUN_FIELDS:
        value = run.get(key)
        out[key] = "" if value is None else str(value)
    out["n_concepts"] = _int(run.get("n_concepts"), "run.n_concepts")
    out["title"] = _str(run.get("title"), "run.title") or "LENS atlas"
    out["config"] = redact(_obj(run.get("config"), "run.config"))
    return out


def normalize_site(site: Any) -> dict:
    """Checked copy of the site data with defaults filled and concepts sorted by importance."""
    if not isinstance(site, dict):
        raise SiteError("site: expected an object with 'run' and 'classes'")
    classes = [_class(e, i) for i, e in enumerate(_list(site.get("classes"), "classes"))]
    seen: set[str] = set()
    for c in classes:
        if c["slug"] in seen:
            raise SiteError(f"duplicate class slug {c['slug']!r}")
        seen.add(c["slug"])
    return {"run": _run(site.get("run")), "classes": classes}


def referenced_paths(cls: dict) -> list[str]:
    """Every image path a class page refers to (to report the ones no asset provides)."""
    out = [cls["thumb"]] if cls["thumb"] else []
    for c in cls["concepts"]:
        out += [p for p in (c["viz"], c["viz_plain"]) if p] + c["crops"]
    out += [p["image"] for p in cls["cluster"]["points"] if p["image"]]
    for a in cls["attributions"]:
        out += [p for p in (a["image"], a["heatmap"]) if p]
    return out
