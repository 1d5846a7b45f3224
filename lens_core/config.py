"""AtlasConfig: every setting of a LENS run, validated by pydantic, loadable from TOML.

The embedded default (``AtlasConfig()``) needs no file: the toy model on the generated toy data,
stored and published under ``./lens-out``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SECRET_KEYS = ("key", "secret", "token", "password", "aws_secret_access_key", "aws_access_key_id")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@?#]*@")


def check_url(value: str | None) -> str | None:
    """A storage URL or path: known fsspec protocols only, never credentials inside the URL."""
    if value is None:
        return value
    if not value.strip():
        raise ValueError("must not be empty")
    for part in value.split("::"):
        if "://" not in part:
            continue
        if _USERINFO.match(part):
            raise ValueError("credentials in URLs are refused (the URL would be logged): use storage_options or AWS_* environment variables")
        import fsspec

        proto = part.split("://", 1)[0].lower()
        if proto not in fsspec.available_protocols():
            raise ValueError(f"unknown storage protocol {proto!r}")
    return value


class ModelConfig(_Section):
    """The classifier: architecture, checkpoint and the layer where it is split into g and h."""

    arch: str = Field("toy", description="torchvision name (resnet50, ...), 'toy', or 'package.module:factory'")
    checkpoint: str | None = Field(None, description="local path, file:// or s3:// URL; None = shipped toy weights / random init")
    num_classes: int | None = Field(None, gt=0, description="output classes; default: the data set's class count")
    layer: str = Field("block4", description="named module where the model is split (g: image -> activations, h: activations -> logits)")
    input_size: int = Field(64, gt=0, description="side of the square model input, pixels")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    @field_validator("checkpoint")
    @classmethod
    def _check_urls(cls, v: str | None) -> str | None:
        return check_url(v)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class DataConfig(_Section):
    """Where the images are: an image-folder layout at any fsspec URL, or the generated toy set."""

    url: str | None = Field(None, description="<root>/<class dir>/*.jpg|png|webp at any fsspec URL; None = generated toy data")
    class_names: str | None = Field(None, description="JSON file {class_dir: name or [name, synonyms...]}")
    images_per_class: int = Field(40, gt=0, description="images sampled per class (deterministic)")
    seed: int = 0
    toy_classes: int = Field(10, ge=2, description="classes of the generated toy data set")
    toy_images_per_class: int = Field(40, gt=0)

    @field_validator("url", "class_names")
    @classmethod
    def _check_urls(cls, v: str | None) -> str | None:
        return check_url(v)


class PatchConfig(_Section):
    """CRAFT patches: squares of a fraction of the image on a regular grid, resized to the model input."""

    fraction: float = Field(64 / 224, gt=0, le=1, description="patch side / image side (reference: 64 of 224)")
    grid: int = Field(4, ge=1, description="patches per side; stride follows (reference: 4x4 = 16, stride 51)")
    image_size: int = Field(128, gt=0, description="images are resized to this side before cutting")
    batch_size: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _fits(self) -> PatchConfig:
        side = int(round(self.fraction * self.image_size))
        if side < 1:
            raise ValueError(f"patches of fraction {self.fraction} of a {self.image_size} px image are under 1 px")
        if self.grid > 1 and (self.image_size - side) // (self.grid - 1) < 1:
            raise ValueError(f"a {self.grid}x{self.grid} grid of {side} px patches does not fit a {self.image_size} px image")
        return self


class ConceptConfig(_Section):
    """NMF concept extraction A ~= U W."""

    n_concepts: int = Field(10, ge=1)
    solver: Literal["torch", "sklearn"] = "torch"
    max_iter: int = Field(500, gt=0)
    tol: float = Field(1e-4, ge=0)
    seed: int = 0


class ImportanceConfig(_Section):
    """Sobol total indices over concept masks (CRAFT) and the logit share."""

    n_designs: int = Field(32, ge=2, description="QMC designs (reference: 32)")
    sampler: Literal["halton", "sobol"] = "halton"
    batch_size: int = Field(256, gt=0)
    images: int = Field(16, ge=1, description="class images whose spatial activations feed the Sobol estimate")
    important_min_images: int = Field(3, ge=1, description="a concept is 'important' when it is the top concept of at least this many images")


class MacoConfig(_Section):
    """MACO feature visualization (Fel et al. 2023). Defaults are a small CPU budget; Horama uses 1000 steps, 1280 px."""

    steps: int = Field(64, gt=0)
    image_size: int = Field(128, gt=0)
    crops: int = Field(4, gt=0, description="random crops per step")
    crop_range: tuple[float, float] = (0.5, 0.9)
    lr: float = Field(1.0, gt=0)
    noise: float = Field(0.05, ge=0)
    value_range: tuple[float, float] = (-2.5, 2.5)
    objective: Literal["dot_cossim", "dot", "cosine"] = "dot_cossim"
    cossim_power: float = 2.0
    batch_size: int = Field(16, gt=0, description="concepts rendered together in one batch")
    magnitude: str | None = Field(None, description="spectrum file (.npy); None = estimated from the run's images")
    seed: int = 0

    @field_validator("magnitude")
    @classmethod
    def _check_urls(cls, v: str | None) -> str | None:
        return check_url(v)

    @model_validator(mode="after")
    def _ranges(self) -> MacoConfig:
        lo, hi = self.crop_range
        if not 0 < lo <= hi <= 1:
            raise ValueError("crop_range must satisfy 0 < low <= high <= 1")
        if self.value_range[0] >= self.value_range[1]:
            raise ValueError("value_range must be (low, high) with low < high")
        return self


class CropsConfig(_Section):
    """Top-activating crops per concept and attribution maps."""

    per_concept: int = Field(10, ge=1)
    one_per_image: bool = True
    size: int = Field(96, gt=0, description="side of a saved crop, pixels")
    attribution_images: int = Field(3, ge=0)
    format: Literal["webp", "jpeg"] = "webp"


class AtlasConfig(_Section):
    """One LENS run: model, data, method settings and where results go."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    patches: PatchConfig = PatchConfig()
    concepts: ConceptConfig = ConceptConfig()
    importance: ImportanceConfig = ImportanceConfig()
    maco: MacoConfig = MacoConfig()
    crops: CropsConfig = CropsConfig()
    store: str = Field("file://./lens-out/store", description="fsspec URL of the run store")
    publish: str = Field("file://./lens-out/site", description="fsspec URL of the published site")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for s3:// (endpoint_url, ...); key/secret default to the environment",
    )
    classes: list[str] | None = Field(None, description="restrict the run to these class ids/names")

    @field_validator("store", "publish")
    @classmethod
    def _check_urls(cls, v: str | None) -> str | None:
        return check_url(v)

    @model_validator(mode="after")
    def _consistent(self) -> AtlasConfig:
        n_patches = self.data.images_per_class * self.patches.grid**2
        if self.concepts.n_concepts > n_patches:
            raise ValueError(
                f"concepts.n_concepts={self.concepts.n_concepts} exceeds the patches per class "
                f"({self.data.images_per_class} images x {self.patches.grid**2} patches = {n_patches})"
            )
        return self

    def method_dict(self) -> dict[str, Any]:
        """The settings that change results (not where they are stored): part of the run id."""
        return self.model_dump(mode="json", exclude={"store", "publish", "storage_options", "classes"})

    def redacted(self) -> dict[str, Any]:
        """The config as a dict safe to log or publish: credentials masked."""
        d = self.model_dump(mode="json")
        d["storage_options"] = redact(d["storage_options"])
        return d


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Mask credential-like values (recursively) so they never reach logs, artifacts or run.json."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(s in k.lower() for s in SECRET_KEYS):
            out[k] = "***"
        else:
            out[k] = v
    return out


def split_secrets(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Move s3 key/secret out of storage options into AWS_* environment variables.

    Flow parameters are stored by the Prefect API, so credentials travel through the environment
    (which s3fs/botocore read) and never through parameters, logs or artifacts.
    """
    public = dict(options)
    env = {}
    for opt, var in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
        if opt in public:
            env[var] = str(public.pop(opt))
    return public, env


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        lines.append(f"{loc}: {e['msg']}")
    return "invalid LENS config: " + "; ".join(lines)


def make_config(data: dict[str, Any] | None = None, **overrides: Any) -> AtlasConfig:
    """Build an AtlasConfig from a dict plus top-level overrides; errors name the field."""
    merged = dict(data or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AtlasConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> AtlasConfig:
    """Load a TOML config file (None = the embedded default), then apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {p} is not valid TOML: {err}") from None
    return make_config(data, **overrides)


def config_from_parameters(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    classes: list[str] | None = None,
    store: str | None = None,
    publish: str | None = None,
) -> AtlasConfig:
    """The AtlasConfig of the build-atlas parameters: the TOML file, inline sections merged over it
    field by field, then the checkpoint, class, store and publish overrides."""
    data: dict[str, Any] = load_config(config_path).model_dump(mode="json") if config_path else {}
    for key, value in (config or {}).items():
        merge = isinstance(value, dict) and isinstance(data.get(key), dict)
        data[key] = {**data[key], **value} if merge else value
    if checkpoint:
        data["model"] = {**data.get("model", {}), "checkpoint": checkpoint}
    return make_config(data, classes=classes or None, store=store, publish=publish)


def short_hash(obj: Any, n: int = 12) -> str:
    """Stable short hash of a JSON-serializable object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def compute_run_id(checkpoint_digest: str, data_url: str, config: AtlasConfig) -> str:
    """run_id = short hash(checkpoint digest, data URL, method config) (DESIGN.md)."""
    return short_hash({"ckpt": checkpoint_digest, "data": data_url, "method": config.method_dict()})
