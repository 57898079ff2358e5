"""The Flower bridge's modules that need no `flwr` are tested here, in the agent's environment.

`integrations/flower` is not installed in the agent's venv (it is its own package, for its own
venv), so its folder is put on the import path for these tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

FLOWER_APP = Path(__file__).resolve().parents[2] / "integrations" / "flower"
FLOWER_VENV = Path(__file__).resolve().parents[2] / ".venv-flower"

if str(FLOWER_APP) not in sys.path:
    sys.path.insert(0, str(FLOWER_APP))
