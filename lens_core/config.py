"""AtlasConfig: every setting of a LENS run, validated by pydantic, loadable from TOML.

The embedded default (``AtlasConfig()``) needs no file: the toy model on the generated toy data,
stored and published under ``./lens-out``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lens_core.identity import is_run_id
from lens_core.secrets import public_options, url_secret

# upper bounds: a form field of the Prefect UI or a TOML typo must not allocate terabytes
MAX_INPUT_SIZE = 1024  # model input side (ImageNet models: 224-600)
MAX_IMAGE_SIZE = 4096  # images are resized to this side before patches are cut
MAX_RENDER_SIZE = 2048  # MACO image side (Horama: 1280)
MAX_CROP_SIZE = 1024
MAX_DESIGNS = 4096  # Sobol QMC designs (CRAFT: 32)
MAX_BATCH = 8192


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _form_schema(schema: dict[str, Any]) -> None:
    """An optional field as Prefect's run form needs it: its type, no `null` default.

    Pydantic writes an optional field as `anyOf: [X, {type: null}]` with `default: null`; the
    Prefect UI then starts on the null branch and shows 'Property is type "None"'. As X without
    a default the field stays optional, an empty input leaves it unset (None), and Prefect's
    parameter validation still accepts null for it (it adds the null branch back).
    """
    for prop in schema.get("properties", {}).values():
        options = prop.get("anyOf") or []
        if "default" in prop and prop["default"] is None and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            if len(rest) == 1:
                del prop["anyOf"], prop["default"]
                prop.update(rest[0])


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, json_schema_extra=_form_schema
    )


def check_url(value: str | None) -> str | None:
    """A storage URL or path: known fsspec protocols only, never credentials inside the URL."""
    if value is None:
        return value
    if not value.strip():
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    for part in value.split("::"):
        why = url_secret(part)
        if why:
            raise ValueError(
                f"credentials in URLs are refused ({why}; the URL would be logged and "
                "published): use storage_options or AWS_* environment variables"
            )
        if "://" not in part:
            continue
        import fsspec

        proto = part.split("://", 1)[0].lower()
        if proto not in fsspec.available_protocols():
            raise ValueError(f"unknown storage protocol {proto!r}")
    return value


class ModelConfig(_Section):
    """The classifier: architecture, checkpoint and the layer where it is split into g and h."""

    arch: str = Field(
        "toy",
        description="torchvision name (resnet50, ...), 'toy', or a factory the worker allows "
        "(an entry point of the group lens.models, or a 'package.module:factory' in "
        "LENS_MODEL_FACTORIES)",
    )
    checkpoint: str | None = Field(
        None,
        description="local path, file:// or s3:// URL; None = shipped toy weights / random init",
    )
    num_classes: int | None = Field(
        None,
        gt=0,
        le=1_000_000,
        description="model outputs; default: read from the checkpoint, else the class-folder count",
    )
    layer: str = Field(
        "block4",
        description="named module where the model is split "
        "(g: image -> activations, h: activations -> logits)",
    )
    input_size: int = Field(
        64, gt=0, le=MAX_INPUT_SIZE, description="side of the square model input, pixels"
    )
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast dtype of the model's forward passes (activations, importance, MACO); "
        "NMF and Sobol statistics stay fp32. fp16 runs as fp32 on CPU",
    )

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

    url: str | None = Field(
        None,
        description="`<root>/<class dir>/*.jpg|png|webp` at any fsspec URL; "
        "empty = the generated toy data",
    )
    class_names: str | None = Field(
        None, description="JSON file `{class_dir: name or [name, synonyms...]}`"
    )
    class_index: str | None = Field(
        None,
        description="JSON file mapping class dirs to the model's label indices: "
        "`{class_dir: index}`, a list of class dirs in label order, or Keras' "
        "imagenet_class_index.json `{index: [dir, name]}`; "
        "required when the folders are not exactly the model's label set in sorted order",
    )
    images_per_class: int = Field(
        40, gt=0, le=1_000_000, description="images sampled per class (deterministic)"
    )
    seed: int = 0
    toy_classes: int = Field(10, ge=2, le=6165, description="classes of the generated toy data set")
    toy_images_per_class: int = Field(40, gt=0, le=10_000)

    @field_validator("url", "class_names", "class_index")
    @classmethod
    def _check_urls(cls, v: str | None) -> str | None:
        return check_url(v)


class PatchConfig(_Section):
    """CRAFT patches: squares of a fraction of the image on a regular grid, resized to the model
    input."""

    fraction: float = Field(
        64 / 224, gt=0, le=1, description="patch side / image side (reference: 64 of 224)"
    )
    grid: int = Field(
        4,
        ge=1,
        le=64,
        description="patches per side; stride follows (reference: 4x4 = 16, stride 51)",
    )
    image_size: int = Field(
        128, gt=0, le=MAX_IMAGE_SIZE, description="images are resized to this side before cutting"
    )
    batch_size: int = Field(64, gt=0, le=MAX_BATCH)

    @model_validator(mode="after")
    def _fits(self) -> PatchConfig:
        side = int(round(self.fraction * self.image_size))
        if side < 1:
            raise ValueError(
                f"patches of fraction {self.fraction} of a {self.image_size} px image "
                "are under 1 px"
            )
        if self.grid > 1 and (self.image_size - side) // (self.grid - 1) < 1:
            raise ValueError(
                f"a {self.grid}x{self.grid} grid of {side} px patches does not fit "
                f"a {self.image_size} px image"
            )
        return self


class ConceptConfig(_Section):
    """Concept extraction A ~= U W with U >= 0: NMF (W >= 0) or semi-NMF (W signed)."""

    method: Literal["auto", "nmf", "semi-nmf"] = Field(
        "auto",
        description="'nmf' (CRAFT) needs a non-negative layer (after a ReLU); 'semi-nmf' "
        "keeps U >= 0 and lets W be signed, for layers after GELU, SiLU or a normalization; 'auto' "
        "picks NMF when the layer is non-negative on the set-up probe, semi-NMF otherwise",
    )
    n_concepts: int = Field(10, ge=1, le=1024)
    solver: Literal["torch", "sklearn"] = Field(
        "torch",
        description="NMF solver: 'torch' (HALS, CPU or GPU) or 'sklearn' (the reference); "
        "semi-NMF has the torch solver only",
    )
    max_iter: int = Field(500, gt=0, le=100_000)
    tol: float = Field(1e-4, ge=0)
    seed: int = 0
    sparsity: float = Field(
        0.05,
        ge=0,
        le=1,
        description="semi-NMF: L1 weight on U (relative to the RMS activation "
        "row) that picks the tightest set of concepts among equally good fits; its bias is removed "
        "by a last unpenalized step",
    )


class ImportanceConfig(_Section):
    """Sobol total indices over concept masks (CRAFT) and the logit share."""

    n_designs: int = Field(32, ge=2, le=MAX_DESIGNS, description="QMC designs (reference: 32)")
    sampler: Literal["halton", "sobol"] = "halton"
    batch_size: int = Field(256, gt=0, le=MAX_BATCH)
    images: int = Field(
        16,
        ge=1,
        le=1024,
        description="class images whose spatial activations feed the Sobol estimate",
    )
    important_min_images: int = Field(
        3,
        ge=1,
        description="a concept is 'important' when it is the top concept of at least "
        "this many images",
    )
    min_share_images: int = Field(
        3,
        ge=1,
        description="the logit share is summed over the class's images that the model "
        "classifies as the class; with fewer such images, concepts are ranked by Sobol importance",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_share_patches" in data:
            raise ValueError(
                "importance.min_share_patches is gone: the logit share is summed over "
                "images now; set importance.min_share_images (default 3) instead"
            )
        return data


class MacoConfig(_Section):
    """MACO feature visualization (Fel et al. 2023). Defaults are a small CPU budget; Horama uses
    1000 steps, 1280 px."""

    steps: int = Field(64, gt=0, le=100_000)
    image_size: int = Field(128, gt=0, le=MAX_RENDER_SIZE)
    crops: int = Field(4, gt=0, le=256, description="random crops per step")
    crop_range: tuple[float, float] = (0.5, 0.9)
    lr: float = Field(1.0, gt=0)
    noise: float = Field(0.05, ge=0)
    value_range: tuple[float, float] = (-2.5, 2.5)
    objective: Literal["dot_cossim", "dot", "cosine"] = "dot_cossim"
    cossim_power: float = 2.0
    batch_size: int = Field(
        16, gt=0, le=1024, description="concepts rendered together in one batch"
    )
    magnitude: str | None = Field(
        None, description="spectrum file (.npy); None = estimated from the run's images"
    )
    seed: int = 0
    top_k: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="render only the top K concepts of each class (the most "
        "important first); empty or 0 = every concept. Not part of the run id: a later run with a "
        "larger K renders only the missing ones",
    )

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

    per_concept: int = Field(10, ge=1, le=1000)
    one_per_image: bool = True
    size: int = Field(96, gt=0, le=MAX_CROP_SIZE, description="side of a saved crop, pixels")
    attribution_images: int = Field(3, ge=0, le=1000)
    format: Literal["webp", "jpeg"] = "webp"


class ChangesConfig(_Section):
    """What changed since the previous checkpoint (a comparison: not part of the run id)."""

    previous_run: str | None = Field(
        None,
        description="compare with this run id; default: the latest finished run of the same "
        "data and method on another checkpoint",
    )
    threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="cosine similarity (of the concepts' patch "
        "coefficients) from which two concepts are the same concept; labels carry over from it",
    )
    most_changed: int = Field(
        10, ge=0, le=1000, description="classes marked as most changed on the index"
    )

    @field_validator("previous_run")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        if v is not None and not is_run_id(v):
            raise ValueError(f"{v!r} is not a run id (12 hexadecimal digits)")
        return v


class MistakesConfig(_Section):
    """Mistakes explained by concepts (a cross-class step over stored results: not part of the
    run id)."""

    examples: int = Field(
        3,
        ge=0,
        le=20,
        description="example images per pair of classes, each with the "
        "overlay of the predicted class's concepts",
    )
    example_pairs: int = Field(
        300, ge=0, le=100_000, description="pairs (most frequent first) that get examples"
    )
    bias_min_classes: int = Field(
        2,
        ge=2,
        le=1000,
        description="a concept is flagged as a bias candidate when it "
        "carries most of the mistaken logit for images of at least this many other classes",
    )


class AtlasConfig(_Section):
    """One LENS run: model, data, method settings and where results go."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    patches: PatchConfig = PatchConfig()
    concepts: ConceptConfig = ConceptConfig()
    importance: ImportanceConfig = ImportanceConfig()
    maco: MacoConfig = MacoConfig()
    crops: CropsConfig = CropsConfig()
    changes: ChangesConfig = ChangesConfig()
    mistakes: MistakesConfig = MistakesConfig()
    store: str = Field("file://./lens-out/store", description="fsspec URL of the run store")
    publish: str = Field("file://./lens-out/site", description="fsspec URL of the published site")
    publish_base_url: str | None = Field(
        None,
        description="public http(s) address at which `publish` is served (a bucket's website "
        "endpoint, a CDN), e.g. `https://lens.example.org/site`: the run's link in the Prefect UI "
        "points there; empty = the `lens serve` command",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for s3:// (endpoint_url, ...); "
        "key/secret default to the environment",
    )
    classes: list[str] | None = Field(
        None,
        description="restrict the run to these classes: folder names (`n01440764`), names from "
        "`class_names` (`tench`), label indices (`0`), or the slugs `lens status` lists; toy data: "
        "`0` to `9`; empty = every class",
    )

    @field_validator("store", "publish")
    @classmethod
    def _check_urls(cls, v: str | None) -> str | None:
        return check_url(v)

    @field_validator("publish_base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and (
            not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", v) or url_secret(v)
        ):
            raise ValueError(
                "must be an http(s) address without credentials or query, "
                "e.g. https://lens.example.org/site"
            )
        return v.rstrip("/") if v else v

    @field_validator("storage_options")
    @classmethod
    def _no_credentials_in_urls(cls, v: dict[str, Any]) -> dict[str, Any]:
        def walk(obj: Any, path: str) -> None:
            if isinstance(obj, dict):
                for k, sub in obj.items():
                    walk(sub, f"{path}.{k}" if path else str(k))
            elif isinstance(obj, str) and (why := url_secret(obj)):
                raise ValueError(
                    f"{path}: credentials in URLs are refused ({why}; they would be "
                    "logged and published): put credentials in AWS_* environment variables"
                )

        walk(v, "")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AtlasConfig:
        n_patches = self.data.images_per_class * self.patches.grid**2
        if self.concepts.n_concepts > n_patches:
            raise ValueError(
                f"concepts.n_concepts={self.concepts.n_concepts} exceeds the patches per class "
                f"({self.data.images_per_class} images x {self.patches.grid**2} patches "
                f"= {n_patches})"
            )
        return self

    def method_dict(self) -> dict[str, Any]:
        """The settings that change results (not where they are stored): part of the run id."""
        # maco.top_k picks which concepts get a picture, never what they are: outside the run id
        return self.model_dump(
            mode="json",
            exclude={
                **dict.fromkeys(
                    (
                        "store",
                        "publish",
                        "storage_options",
                        "classes",
                        "changes",
                        "mistakes",
                        "publish_base_url",
                    ),
                    True,
                ),
                "maco": {"top_k"},
            },
        )

    def redacted(self) -> dict[str, Any]:
        """The config as a dict safe to log, store or publish: only allow-listed storage options."""
        d = self.model_dump(mode="json")
        d["storage_options"] = public_options(d["storage_options"])
        return d


_ENV_SECRETS = {
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
    "client_kwargs.aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "client_kwargs.aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "client_kwargs.aws_session_token": "AWS_SESSION_TOKEN",
}


def split_secrets(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Move S3 credentials out of storage options into AWS_* environment variables.

    Flow parameters are stored by the Prefect API, so credentials travel through the environment
    (which s3fs/botocore read) and never through parameters, logs or artifacts. The top-level
    key/secret/token and client_kwargs' aws_* credentials move; any other secret is left in place
    for `refuse_secrets` to name.
    """
    public = {k: (dict(v) if isinstance(v, dict) else v) for k, v in options.items()}
    env = {}
    for path, var in _ENV_SECRETS.items():
        *parents, name = path.split(".")
        holder = public
        for p in parents:
            holder = holder.get(p) if isinstance(holder.get(p), dict) else {}
        if name in holder:
            env.setdefault(var, str(holder.pop(name)))  # the top-level option wins
    return public, env


def refuse_secrets(parameters: dict[str, Any], where: str = "parameters") -> None:
    """ConfigError naming every parameter that holds a credential: Prefect stores parameters."""
    from lens_core.secrets import find_secrets

    found = find_secrets(parameters)
    if found:
        raise ConfigError(
            f"{where} hold credentials ({', '.join(found[:8])}): Prefect stores flow parameters "
            "and shows them in the UI. Pass credentials through the worker's environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or a Prefect Secret block loaded into it) "
            "and keep only public options (endpoint_url, region_name, ...) in storage_options"
        )


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


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields of a TOML config file, not validated yet (`make_config` does that)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from None


def load_config(
    path: str | os.PathLike[str] | None = None, checkpoint: str | None = None, **overrides: Any
) -> AtlasConfig:
    """Load a TOML config file (None = the embedded default), then apply the overrides: top-level
    fields, and `checkpoint` for model.checkpoint."""
    data = read_toml(path) if path is not None else {}
    return make_config(with_checkpoint(data, checkpoint), **overrides)


def with_checkpoint(data: dict[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """Config fields with model.checkpoint set to `checkpoint` (unchanged when None)."""
    return (
        {**data, "model": {**data.get("model", {}), "checkpoint": checkpoint}}
        if checkpoint
        else data
    )


def inline_fields(config: AtlasConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The fields a `config` parameter sets, to merge over a TOML file (`config_from_parameters`):
    the keys of a dict, or the explicitly set fields of an AtlasConfig, less every field whose
    value is AtlasConfig's default.

    Which wins, per field, when both `config_path` and `config` are given: a `config` field that
    differs from the default wins; one left at its default keeps the file's value. Prefect's run
    form submits every field of a section once `config` is switched on, most of them at their
    defaults: they must not undo the file.
    """
    if config is None:
        return {}
    given = (
        config.model_dump(mode="json", exclude_unset=True)
        if isinstance(config, AtlasConfig)
        else dict(config)
    )
    return _changed(given, AtlasConfig().model_dump(mode="json"))


def _changed(given: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of `given` that differ from `default`, section by section."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        base = default.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(base, dict) and base:
            sub = _changed(value, base)
            if sub:
                out[key] = sub
        elif _jsonable(value) != base:
            out[key] = value
    return out


_MISSING = object()


def _jsonable(value: Any) -> Any:
    """A value as its JSON dump compares (tuples as lists, models as dicts)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def config_from_parameters(
    config_path: str | None = None,
    config: AtlasConfig | dict[str, Any] | None = None,
    checkpoint: str | None = None,
    classes: list[str] | None = None,
    store: str | None = None,
    publish: str | None = None,
) -> AtlasConfig:
    """The AtlasConfig of the build-atlas parameters: the TOML file, inline sections merged over it
    field by field, then the checkpoint, class, store and publish overrides.

    Parameters are stored by the Prefect API: any that holds a credential is refused
    (`refuse_secrets`); a TOML file on the worker may hold them, it is not a parameter. A
    validated AtlasConfig alone (what `lens run` passes) is used as it is; anything else is
    validated once, after the merge.
    """
    overrides = {"checkpoint": checkpoint, "store": store, "publish": publish}
    whole = isinstance(config, AtlasConfig) and not config_path
    inline = config.model_dump(mode="json") if whole else inline_fields(config)
    refuse_secrets(
        {"config": inline, **overrides, "config_path": config_path, "classes": classes or []},
        "flow parameters",
    )
    if isinstance(config, AtlasConfig) and whole and not classes and not any(overrides.values()):
        return config
    data: dict[str, Any] = read_toml(config_path) if config_path else {}
    for key, value in inline.items():
        merge = isinstance(value, dict) and isinstance(data.get(key), dict)
        data[key] = {**data[key], **value} if merge else value
    return make_config(
        with_checkpoint(data, checkpoint), classes=classes or None, store=store, publish=publish
    )
