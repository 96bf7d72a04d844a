"""Where this var_ssg was imported from, for the child processes that must import the same code
(DESIGN.md "Packaging")."""
from __future__ import annotations

import os


def import_root() -> str:
    """The folder to put first on a child's PYTHONPATH: site-packages (or a --target folder) for
    an installed wheel, where the packages live under var_ssg/; the checkout's root for a
    checkout, whose `var_ssg` link points at the root itself."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the folder holding common/
    return os.path.dirname(pkg) if os.path.basename(pkg) == "var_ssg" else pkg
