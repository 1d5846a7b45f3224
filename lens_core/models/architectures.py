"""Classifiers by architecture name: a torchvision name, the embedded toy CNN, or a factory that
whoever runs the worker allowed (an entry point in the group ``lens.models``, or a
"package.module:factory" listed in ``LENS_MODEL_FACTORIES``): a flow parameter alone never makes
LENS import and call a function.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from lens_core.models.errors import ModelError
from lens_core.settings import settings

FACTORY_ENV = "LENS_MODEL_FACTORIES"  # comma-separated "package.module:factory" the worker allows
ENTRY_POINT_GROUP = "lens.models"  # installed packages register named factories here


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised (deterministic, seed 0) classifier for an architecture name."""
    factory = resolve_factory(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "toy":
            from lens_core.toy.model import ToyCNN

            return ToyCNN(num_classes=num_classes)
        if factory is not None:
            return _call_factory(factory, arch, num_classes)
        import torchvision

        try:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except ValueError as err:
            raise ModelError(f"unknown architecture {arch!r}: {err}") from None


def allowed_factories() -> dict[str, str]:
    """{name or "module:attr": "module:attr"} of the factories this process may import and call:
    entry points of the group `lens.models`, and the LENS_MODEL_FACTORIES list."""
    from importlib.metadata import entry_points

    allowed = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        allowed[ep.name] = allowed[ep.value] = ep.value
    for item in settings().model_factories.split(","):
        if item.strip():
            allowed[item.strip()] = item.strip()
    return allowed


def resolve_factory(arch: str) -> Any | None:
    """The allowed factory callable named by `arch`, None for toy/torchvision names.

    ModelError, before anything is imported, for a "module:callable" nobody allowed: a flow
    parameter (the Prefect UI's form) must not be able to call arbitrary functions.
    """
    if arch == "toy":
        return None
    allowed = allowed_factories()
    target = allowed.get(arch)
    if target is None:
        if ":" in arch:
            raise ModelError(
                f"model factory {arch!r} is not allowed: register it as an entry point in the "
                f"group {ENTRY_POINT_GROUP!r} of an installed package, or list it in "
                f"{FACTORY_ENV} in the worker's environment"
            )
        return None
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"cannot import model factory {arch!r} ({target}): {err}") from None
    if not callable(obj):
        raise ModelError(f"model factory {arch!r} ({target}) is not callable")
    return obj


def _call_factory(factory: Any, arch: str, num_classes: int) -> nn.Module:
    try:
        params = inspect.signature(factory).parameters
        takes_k = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # builtins have no signature
        takes_k = False
    try:
        model = factory(num_classes=num_classes) if takes_k else factory()
    except Exception as err:  # noqa: BLE001 - any failure of user code is a model error
        raise ModelError(f"model factory {arch!r} failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model factory {arch!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model
