"""Developer and user tools: emulators, landing zone generator, demo, PHI audit.

The tools use the domain package under plugins/ (which Airflow itself puts on sys.path);
outside Airflow it is made importable here, once.
"""

import sys
from pathlib import Path

_PLUGINS = str(Path(__file__).resolve().parent.parent / "plugins")
if _PLUGINS not in sys.path:
    sys.path.append(_PLUGINS)
