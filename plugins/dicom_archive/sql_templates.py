"""Summary queries over a collection's `dicom` table: Jinja templates in include/sql.

Templates take identifiers only (`{{ project }}`, `{{ dataset }}`, `{{ table }}`, validated here);
every user value is a named query parameter (`@name`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import jinja2
from google.cloud import bigquery

from dicom_archive.bigquery_tables import DEFAULT_TABLE, check_name
from dicom_archive.resources import include_dir

SQL_DIR = include_dir() / "sql"

_TEMPLATE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Named parameters in rendered SQL; the templates keep '@' out of strings and comments' examples.
_PARAM_RE = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)")
_COMMENT_RE = re.compile(r"--[^\n]*")

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(SQL_DIR),
    undefined=jinja2.StrictUndefined,
    autoescape=False,  # SQL, not HTML; values never go through Jinja
    keep_trailing_newline=True,
)


def available_templates() -> list[str]:
    """Names of the runnable templates (files starting with '_' are shared macros)."""
    return sorted(p.stem for p in SQL_DIR.glob("*.sql") if not p.name.startswith("_"))


def render_sql(name: str, *, project: str, dataset: str, table: str = DEFAULT_TABLE) -> str:
    """The SQL of template `name` for one table, identifiers validated."""
    if not _TEMPLATE_RE.match(name) or name not in available_templates():
        raise ValueError(f"unknown SQL template {name!r}; known: {', '.join(available_templates())}")
    return _env.get_template(f"{name}.sql").render(
        project=check_name(project, "project"), dataset=check_name(dataset, "dataset"), table=check_name(table, "table")
    )


def query_parameters(sql: str, params: Mapping[str, Any] | None) -> list[bigquery.ScalarQueryParameter]:
    """Typed parameters for `sql`: every `@name` it uses, NULL (no filter) when not given."""
    used = list(dict.fromkeys(_PARAM_RE.findall(_COMMENT_RE.sub("", sql))))
    given = dict(params or {})
    unknown = sorted(set(given) - set(used))
    if unknown:
        raise ValueError(f"parameters not used by the query: {', '.join(unknown)}; it takes: {', '.join(used)}")
    return [_parameter(name, given.get(name)) for name in used]


def _parameter(name: str, value: Any) -> bigquery.ScalarQueryParameter:
    if value is None:
        kind = "STRING"  # the templates CAST parameters, so a typed NULL of any kind works
    elif isinstance(value, bool):  # before int: bool is an int subclass
        kind = "BOOL"
    elif isinstance(value, int):
        kind = "INT64"
    elif isinstance(value, float):
        kind = "FLOAT64"
    elif isinstance(value, Decimal):
        kind = "NUMERIC"
    elif isinstance(value, str):
        kind = "STRING"
    elif isinstance(value, dt.datetime):  # before date: datetime is a date subclass
        kind = "TIMESTAMP" if value.tzinfo else "DATETIME"
    elif isinstance(value, dt.date):
        kind = "DATE"
    else:
        raise TypeError(f"parameter {name!r}: unsupported type {type(value).__name__}")
    return bigquery.ScalarQueryParameter(name, kind, value)


def run_summary(
    client: bigquery.Client,
    name: str,
    *,
    project: str,
    dataset: str,
    params: Mapping[str, Any] | None = None,
    table: str = DEFAULT_TABLE,
    location: str | None = None,
) -> list[dict[str, Any]]:
    """Run template `name` with `params` and return its rows as dicts."""
    sql = render_sql(name, project=project, dataset=dataset, table=table)
    config = bigquery.QueryJobConfig(query_parameters=query_parameters(sql, params))
    job = client.query(sql, job_config=config, location=location)
    return [dict(row.items()) for row in job.result()]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as a plain text table for task logs (numbers right-aligned, NULL as blank)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(line[i]) for line in cells)) for i, col in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(col), int | float | Decimal) or row.get(col) is None for row in rows) for col in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))
        return " | ".join(parts).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(values) for values in cells)])
