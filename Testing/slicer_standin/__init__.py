"""A stand-in of the Slicer/MRML API that ProbSAMSlicer uses — a MOCK, because 3D Slicer cannot run in CI.

``install()`` puts the fake ``slicer``, ``qt`` and ``ctk`` modules (this folder) and the ProbSAMSlicer
module folder on sys.path, with a fresh scene; ``uninstall()`` removes them again. ``vtk`` is the real
package: matrices and tables are real vtk objects, arrays are numpy. See slicer/__init__.py for what the
stand-in models and what it does not.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1] / "ProbSAMSlicer"
_PREFIXES = ("slicer", "qt", "ctk", "ProbSAMSlicer", "ProbSAMSlicerLib", "PyTorchUtils")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _PREFIXES:
            del sys.modules[name]


def install():
    """Fresh stand-in modules; returns the ``slicer`` module."""
    _purge()
    for path in (str(MODULE_DIR), str(HERE)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import slicer

    slicer.util.calls.clear()
    slicer.util.answers["confirmOkCancelDisplay"] = True
    return slicer


def uninstall() -> None:
    _purge()
    for path in (str(MODULE_DIR), str(HERE)):
        while path in sys.path:
            sys.path.remove(path)
