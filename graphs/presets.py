"""Any family's preset by exact name: `infinity-*` from graphs.infinity_config (text-to-image,
DESIGN.md "Infinity"), every other name from graphs.config (VAR)."""
from __future__ import annotations

from .config import get_preset
from .infinity_config import get_infinity_preset


def get_model_preset(name: str):
    if isinstance(name, str) and name.startswith("infinity-"):
        return get_infinity_preset(name)
    return get_preset(name)
