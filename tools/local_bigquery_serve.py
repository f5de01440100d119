"""Start the local-bigquery emulator with its dataset and table creation serialized, as BigQuery's is.

local-bigquery checks that a table (or dataset) is absent and then creates it, with nothing
between the two: when two requests create one table at once, both can pass the check, and the
loser's DuckLake commit fails. The emulator answers that 400 "Failed to commit DuckLake
transaction", where BigQuery answers 409 Already Exists. The pipeline relies on the 409 (its
`create_table(exists_ok=True)` then reads the table the other run made), so concurrent runs of a
new collection failed now and then against the emulator only.

Run with the emulator's own Python (its venv, Python 3.13), with the arguments of
`local-bigquery`; tools/emulators.py does. Nothing of the project is imported here.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from local_bigquery.catalog import datasets, tables
from local_bigquery.cli import main

_catalog_lock = threading.Lock()


def _one_at_a_time(create: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(create)
    def serialized(*args: Any, **kwargs: Any) -> Any:
        with _catalog_lock:
            return create(*args, **kwargs)

    return serialized


# The REST handlers look these up on the module at each call, so replacing them here is enough.
tables.create = _one_at_a_time(tables.create)
datasets.create = _one_at_a_time(datasets.create)

if __name__ == "__main__":
    sys.exit(main())
