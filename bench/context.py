"""What every benchmark gets: the sizes of this run and, on demand, the shared emulators."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from bench.cloud import Emulators, running_emulators
from bench.config import Sizes


@dataclass
class Context:
    sizes: Sizes
    quick: bool
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _emulators: Emulators | None = None

    def emulators(self) -> Emulators:
        """Started at first use (a few seconds), stopped when the run ends."""
        if self._emulators is None:
            print("  starting the Cloud Storage and BigQuery emulators on free ports")
            self._emulators = self.stack.enter_context(running_emulators())
        return self._emulators

    def close(self) -> None:
        self.stack.close()
