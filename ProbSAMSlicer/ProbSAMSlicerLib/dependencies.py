"""Checking and installing what ProbSAMLib needs, on first use (never at Slicer start-up).

torch (and torchvision, which segment_anything imports) goes through SlicerPyTorch's PyTorchUtils, which
picks the build matching the GPU driver; we never pin a torch version or force a CUDA backend. The
small pure-Python packages go through Slicer's own installer: ``slicer.packaging.pip_ensure`` (Slicer
5.12+), which asks, shows progress, raises RuntimeError when the user declines and installs nothing in
--testing runs; on older Slicer ``slicer.util.pip_install`` after our own confirmation.

The list is ProbSAMLib/requirements.txt, the same file the pip package's dependencies come from (shipped
next to ProbSAMLib's code in the extension). Every package on it is checked by its import name; what
Slicer ships (SimpleITK, numpy, scipy, Pillow) is found and left alone.

In testing mode (``slicer.app.testingEnabled()``) nothing is installed and nobody is asked: a missing
package is an error that says to install PyTorch (and the rest) first.
"""

import importlib
import importlib.util
import re
import subprocess
from pathlib import Path

import slicer

REQUESTER = "ProbSAMSlicer"
REQUIREMENTS_FILE = "requirements.txt"  # in the ProbSAMLib package: the pip package's dependency list too
# pip name -> import name, where they differ other than by "-" / "_"
IMPORT_NAMES = {"pillow": "PIL"}
PYTORCH = ("torch", "torchvision")  # installed by SlicerPyTorch's PyTorchUtils, not by pip here


def requirements_path() -> Path:
    """ProbSAMLib/requirements.txt, found without importing ProbSAMLib: next to this package in the installed
    extension (qt-scripted-modules/), in the repository root in a source checkout, or wherever Python finds
    ProbSAMLib."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "ProbSAMLib", here.parents[1] / "ProbSAMLib"]
    spec = importlib.util.find_spec("ProbSAMLib")
    if spec is not None and spec.origin:
        candidates.insert(0, Path(spec.origin).parent)
    for folder in candidates:
        if (folder / REQUIREMENTS_FILE).is_file():
            return folder / REQUIREMENTS_FILE
    raise FileNotFoundError(f"ProbSAMLib/{REQUIREMENTS_FILE} not found (looked in "
                            + ", ".join(str(folder) for folder in candidates) + ")")


def read_requirements(path=None) -> list:
    """[(pip name, import name, requirement)] from ProbSAMLib/requirements.txt, in its order."""
    entries = []
    for line in Path(path or requirements_path()).read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
        entries.append((name, IMPORT_NAMES.get(name.lower(), name.replace("-", "_")), requirement))
    return entries


def _version_requirement(name: str) -> str:
    """The version part of torch's / torchvision's requirement (">=2.1"), as PyTorchUtils takes it."""
    for pip_name, _, requirement in read_requirements():
        if pip_name == name:
            return requirement[len(pip_name):].strip()
    return ""


class DependencyError(RuntimeError):
    """A required package is missing and was not installed (declined or failed)."""


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# What the worker needs to relay a run to a `probsam serve` server (remote mode): ProbSAMLib's job, wire
# format and HTTP client use numpy and the standard library only, so a laptop needs no PyTorch.
REMOTE_MODE = ("numpy",)


def missing_dependencies(remote: bool = False) -> list:
    """Pip requirements of what is not importable now; "torch" / "torchvision" stand for PyTorchUtils.
    ``remote``: only what remote mode needs."""
    entries = [e for e in read_requirements() if not remote or e[0] in REMOTE_MODE]
    missing = [name for name, module, _ in entries if name in PYTORCH and not _importable(module)]
    return missing + [requirement for name, module, requirement in entries
                      if name not in PYTORCH and not _importable(module)]


def _package_installer():
    """slicer.packaging when this Slicer has pip_ensure (5.12+), else None."""
    try:
        module = importlib.import_module("slicer.packaging")
    except ImportError:
        return None
    return module if hasattr(module, "pip_ensure") else None


def testing_mode() -> bool:
    app = getattr(slicer, "app", None)
    return bool(app is not None and app.testingEnabled())


def install_torch(ask: bool) -> None:
    """torch + torchvision through SlicerPyTorch (the right CUDA build for this machine)."""
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError("ProbSAMSlicer needs PyTorch: install the 'PyTorch' extension from the Extensions "
                              "Manager, restart Slicer, and click 'Sample masks' again.") from None
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=ask, torchVersionRequirement=_version_requirement("torch"),
            torchvisionVersionRequirement=_version_requirement("torchvision"))
    except subprocess.CalledProcessError as error:  # pip failed inside installTorch
        raise DependencyError(f"installing PyTorch failed (pip exit status {error.returncode}). Install it from "
                              f"the 'PyTorch Util' module, restart Slicer, then click 'Sample masks' again.") from error
    if torch is None:
        raise DependencyError("PyTorch was not installed (declined or failed). Install it from the 'PyTorch Util' "
                              "module, then click 'Sample masks' again.")


def install_packages(requirements: list, ask: bool) -> None:
    """The small packages, through pip_ensure where Slicer has it, else confirm + pip_install."""
    installer = _package_installer()
    try:
        if installer is not None:
            try:
                installer.pip_ensure(requirements, prompt_install=ask, requester=REQUESTER)
            except RuntimeError as error:  # pip_ensure's answer to "Cancel"
                raise DependencyError(f"installation of {', '.join(requirements)} was declined or failed: "
                                      f"{error}") from error
        else:
            if ask and not slicer.util.confirmOkCancelDisplay(
                    "ProbSAMSlicer needs these Python packages, which will be downloaded and installed now:\n\n"
                    + "\n".join(requirements), windowTitle="Install Python packages?"):
                raise DependencyError("installation of " + ", ".join(requirements) + " was declined")
            slicer.util.pip_install(" ".join(requirements))
    except DependencyError:
        raise
    except Exception as error:  # pip failures come as CalledProcessError, RuntimeError, ...
        raise DependencyError(f"installing {', '.join(requirements)} failed: {error}. On Windows a package that "
                              f"is already loaded cannot be replaced: restart Slicer and try again.") from error
    importlib.invalidate_caches()


def ensure_dependencies(ask: bool = True, remote: bool = False) -> list:
    """Install whatever is missing (asking first when ``ask``; with ``remote``, only what remote mode needs);
    returns what was missing.

    Raises DependencyError with a message for the user when something is still missing afterwards.
    """
    missing = missing_dependencies(remote)
    if not missing:
        return []
    if testing_mode():
        raise DependencyError("install PyTorch first (the 'PyTorch' extension's PyTorch Util module), then "
                              + ", ".join(m for m in missing if m not in PYTORCH)
                              + "; testing mode installs nothing: missing " + ", ".join(missing))
    if any(name in missing for name in PYTORCH):
        install_torch(ask)
    packages = [requirement for requirement in missing if requirement not in PYTORCH]
    if packages:
        install_packages(packages, ask)
    still = missing_dependencies(remote)
    if still:
        raise DependencyError("still missing (installation declined or failed): " + ", ".join(still)
                              + ". Restart Slicer and try again, or install them from the Python console.")
    return missing
