"""The one place that imports pylidc, so it works on current NumPy and setuptools.

pylidc 0.2.3 (2021) uses `np.int` / `np.float` (removed in NumPy 1.24) and imports `pkg_resources`
(removed in setuptools 81). Everything in Training/ gets pylidc through :func:`import_pylidc`.
It also caches `Scan.slice_zvals`, which pylidc rebuilds from hundreds of ORM rows for every
contour it converts (the annotation DB is read-only, so the cached values never go stale).
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np

_INSTALL_HINT = 'pip install pylidc "setuptools<81"'


def _add_numpy_aliases() -> None:
    # Only the two aliases pylidc needs. np.bool exists again in NumPy 2 and must not be touched
    # (overriding it breaks numpy.ma).
    for name, value in (("int", int), ("float", float)):
        if name not in np.__dict__:
            setattr(np, name, value)


def _cache_slice_zvals(pl) -> None:
    original = pl.Scan.slice_zvals.fget

    def slice_zvals(scan):
        cached = scan.__dict__.get("_probsam_slice_zvals")
        if cached is None:
            cached = original(scan)
            cached.flags.writeable = False
            scan.__dict__["_probsam_slice_zvals"] = cached
        return cached

    slice_zvals.__doc__ = original.__doc__
    pl.Scan.slice_zvals = property(slice_zvals)


def import_pylidc():
    """Import pylidc with the compatibility shims in place and return the module."""
    _add_numpy_aliases()  # also needed when someone imported pylidc before us
    pylidc = sys.modules.get("pylidc")
    if pylidc is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources' own deprecation notice
            try:
                import pkg_resources  # noqa: F401  (pylidc imports it at module level)
            except ImportError as exc:
                raise ImportError(
                    "pylidc needs pkg_resources, which setuptools 81 removed. "
                    f"Install an older setuptools: {_INSTALL_HINT}") from exc
            try:
                import pylidc
            except ImportError as exc:
                raise ImportError(f"pylidc is not installed: {_INSTALL_HINT}") from exc
    if not getattr(pylidc, "_probsam_patched", False):
        _cache_slice_zvals(pylidc)
        pylidc._probsam_patched = True
    return pylidc


def set_dicom_root(path: str) -> None:
    """Point pylidc at a DICOM root for this process only (never writes ~/.pylidcrc).

    pylidc's `Scan.get_path_to_dicom_files` reads the root through the module-level function
    `_get_dicom_file_path_from_config_file`, which otherwise parses (and may create) the rc file
    in the user's home; replacing that function is the narrowest override.
    """
    import_pylidc()
    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"DICOM root {root!r} is not a directory")
    scan_module = sys.modules["pylidc.Scan"]
    scan_module._get_dicom_file_path_from_config_file = lambda: root
