"""NDJSON rows checked against the table schema, by a pydantic model built from it, before anything
reaches BigQuery: a bad row fails the load naming its line and column. Good values come out ready
for an NDJSON load (timestamps in UTC, numbers given as text parsed, a null REPEATED value as []).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Annotated, Any, NotRequired

from google.cloud import bigquery
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic takes typing's TypedDict from Python 3.12 on

from dicom_archive.bigquery_tables import type_and_mode


class RowError(ValueError):
    """`errors`: (1-based NDJSON line, column, problem); `row`, `column`, `problem`: the first."""

    def __init__(self, errors: Sequence[tuple[int, str | None, str]]) -> None:
        self.errors = list(errors)
        self.row, self.column, self.problem = self.errors[0]
        shown = "; ".join(f"row {r}" + (f", column {c!r}" if c else "") + f": {p}" for r, c, p in self.errors[:10])
        more = f" (and {len(self.errors) - 10} more)" if len(self.errors) > 10 else ""
        super().__init__(f"{len(self.errors)} bad row value(s): {shown}{more}")


def _reject(test: Any, problem: str) -> Any:
    def check(value: Any) -> Any:
        if test(value):
            raise ValueError(problem)
        return value

    return check


_NUMBER = BeforeValidator(_reject(lambda v: isinstance(v, bool), "a boolean is not a number"))  # pydantic: True == 1
# BigQuery reads a timestamp without offset as UTC; so do we, and give each instant one spelling.
_UTC = AfterValidator(lambda t: t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC))
# The types of include/schemas/; any other (FLOAT, RECORD, ...) is left for the load job to check.
_VALUE_TYPES: dict[str, Any] = {
    "STRING": str,
    "INTEGER": Annotated[int, _NUMBER, Field(ge=-(2**63), le=2**63 - 1)],
    "DATE": dt.date,
    "TIMESTAMP": Annotated[dt.datetime, _UTC],
    "JSON": Annotated[Any, AfterValidator(_reject(lambda v: not isinstance(v, dict | list), "not an object or array"))],
}
_EMPTY_IF_NULL = BeforeValidator(lambda v: [] if v is None else v)


@functools.lru_cache(maxsize=8)
def _row_adapter(schema: tuple[bigquery.SchemaField, ...]) -> TypeAdapter[Any]:
    # A TypedDict, not a model: any column name is a key, none clashes with pydantic's own names.
    columns: dict[str, Any] = {}
    for f in schema:
        kind, mode = type_and_mode(f)
        value = _VALUE_TYPES.get(kind, Any)
        if mode == "REPEATED":
            columns[f.name] = NotRequired[Annotated[list[value], _EMPTY_IF_NULL]]
        else:
            columns[f.name] = value if mode == "REQUIRED" else NotRequired[value | None]
    row = TypedDict("Row", columns)  # type: ignore[misc]
    return TypeAdapter(with_config(ConfigDict(extra="forbid", coerce_numbers_to_str=True))(row))


def check_rows(ndjson: Iterable[bytes], schema: Sequence[bigquery.SchemaField]) -> Iterator[dict]:
    """The good rows of the NDJSON parts, one at a time (a batch's rows never need to be in memory
    together); then, if any line was bad, a RowError naming every bad line and column. Blank lines
    are skipped but counted."""
    adapter, by_name = _row_adapter(tuple(schema)), {f.name: f for f in schema}
    errors = []
    lines = (line for part in ndjson for line in part.splitlines())
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            valid = adapter.validate_json(line)
        except ValidationError as exc:
            errors += [_problem(number, err, by_name) for err in exc.errors()]
        else:
            yield adapter.dump_python(valid, mode="json")
    if errors:
        raise RowError(errors)


def _problem(number: int, err: Any, by_name: Mapping[str, bigquery.SchemaField]) -> tuple[int, str | None, str]:
    loc = err["loc"]
    if not loc:  # the line is no JSON object
        return number, None, err["msg"]
    column = str(loc[0])
    if column not in by_name:
        return number, column, "column not in the table schema"
    kind, mode = type_and_mode(by_name[column])
    what = f"{mode} {kind}" + (f" item {loc[1]}" if len(loc) > 1 else "")
    if err["type"] == "missing" or (len(loc) == 1 and err["input"] is None):
        return number, column, f"{what}: value missing"
    # The value's type, never the value: the message ends up in logs.
    return number, column, f"{what}: {err['msg']} (got {type(err['input']).__name__})"
