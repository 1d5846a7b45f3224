"""Flow parameters as Prefect's run form shows them.

An empty optional field starts as an empty input, not as the "None" choice (which the UI shows as
'Property is type "None"'); `config` starts with its sections open. The Python default stays
None; "" and [] from the form mean "not set" (`given`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from lens_core.config import AtlasConfig

FormText = Annotated[str | None, Field(json_schema_extra={"default": ""})]
FormClasses = Annotated[list[str] | None, Field(json_schema_extra={"default": []})]
FormConfig = Annotated[AtlasConfig | None, Field(json_schema_extra={"default": {}})]


def given(value: Any) -> Any:
    """None for what a form leaves empty ("", whitespace, [])."""
    if isinstance(value, str):
        return value.strip() or None
    return value or None
