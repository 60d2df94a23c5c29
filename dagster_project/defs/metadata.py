"""Markdown for the Dagster UI's asset metadata (tables and inline images), shared by the asset
modules so that none imports another's helpers."""

import base64
from pathlib import Path

import polars as pl


def markdown_table(table: pl.DataFrame) -> str:
    """A polars table as a markdown table for the Dagster UI."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in table.iter_rows()]
    return "\n".join(lines)


def counts_by(table: pl.DataFrame, rows: str, columns: str) -> str:
    """Markdown cross-tab of record counts (``rows`` x ``columns``) with totals."""
    if table.height == 0:
        return "(no records)"
    values = sorted(table.get_column(columns).fill_null("null").unique().to_list())
    counts = (
        table.with_columns(pl.col(rows).fill_null("null"), pl.col(columns).fill_null("null"))
        .group_by(rows)
        .agg([(pl.col(columns) == v).sum().alias(v) for v in values] + [pl.len().alias("total")])
        .sort(rows)
    )
    return markdown_table(counts)


def dict_table(values: dict, key: str, value: str) -> str:
    """A mapping as a two-column markdown table."""
    return markdown_table(pl.DataFrame({key: list(values), value: [values[k] for k in values]}))


def inline_png(path: Path) -> str:
    """A PNG as a markdown image with its bytes inline: local file paths do not load in the
    browser the Dagster UI runs in."""
    return f"![{path.name}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
