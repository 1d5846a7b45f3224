"""What the `lens` subcommands share: class lists, finding a run, and tables shown as plain text."""

from __future__ import annotations

from typing import Any

from lens_core.config import ConfigError
from lens_core.naming import plain_text
from lens_core.urls import normalize_url

_CONTROL = str.maketrans(
    {c: "\N{REPLACEMENT CHARACTER}" for c in [*range(0, 9), *range(11, 32), 127]}
)


def class_list(text: str | None) -> list[str] | None:
    """`--classes a,b,c` as a list (None when empty: every class)."""
    return [c for c in (text or "").split(",") if c] or None


def find_record(store_url: str, storage_options: dict[str, Any], run_id: str | None = None) -> Any:
    """The run `run_id` of a store, or its latest run; ConfigError naming the store when absent."""
    from lens_core.lineage import find_run, list_runs

    try:
        if run_id:
            return find_run(store_url, run_id, storage_options)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    runs = list_runs(store_url, storage_options)
    if not runs:
        raise ConfigError(f"no run found under {normalize_url(store_url)}/runs")
    return runs[-1]


def cell(value: Any) -> Any:
    """A table cell shown as plain text: no Rich markup ([/], [link=...]), no control characters
    (ESC sequences, shown as U+FFFD) and no Unicode format characters (bidi overrides that reverse
    the row, zero-width marks) from class folders or error messages reach the terminal."""
    from rich.text import Text

    lines = str(value).translate(_CONTROL).split("\n")
    return Text("\n".join(plain_text(line) for line in lines))


def print_table(title: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """Rows as a Rich table of plain-text cells (None shown as "-"), at least 120 columns wide."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=cell(title))
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(cell("-" if r[c] is None else r[c]) for c in columns))
    Console(width=max(120, Console().width)).print(table)
