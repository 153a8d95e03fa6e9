"""Checking and installing what ProbSAMLib needs, on first use (never at Slicer start-up).

torch (and torchvision, which segment_anything imports) goes through SlicerPyTorch's PyTorchUtils, which
picks the build matching the GPU driver; we never pin a torch version or force a CUDA backend. The
small pure-Python packages go through Slicer's own installer: ``slicer.packaging.pip_ensure`` (Slicer
5.12+), which asks, shows progress, raises RuntimeError when the user declines and installs nothing in
--testing runs; on older Slicer ``slicer.util.pip_install`` after our own confirmation. SimpleITK, numpy
and scipy ship with Slicer; scipy is still checked.

In testing mode (``slicer.app.testingEnabled()``) nothing is installed and nobody is asked: a missing
package is an error that says to install PyTorch (and the rest) first.
"""

import importlib
import importlib.util
import subprocess

import slicer

TORCH_REQUIREMENT = ">=2.1"
TORCHVISION_REQUIREMENT = ">=0.16"
# (import name, pip requirement)
PACKAGES = (
    ("segment_anything", "segment-anything>=1.0"),
    ("safetensors", "safetensors>=0.4"),
    ("platformdirs", "platformdirs>=3"),
    ("tqdm", "tqdm>=4.60"),
    ("scipy", "scipy>=1.9"),
)
REQUESTER = "ProbSAMSlicer"


class DependencyError(RuntimeError):
    """A required package is missing and was not installed (declined or failed)."""


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def missing_dependencies() -> list:
    """Pip requirements of what is not importable now; "torch" / "torchvision" stand for PyTorchUtils."""
    missing = [name for name in ("torch", "torchvision") if not _importable(name)]
    return missing + [requirement for module, requirement in PACKAGES if not _importable(module)]


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
            askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT,
            torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
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


def ensure_dependencies(ask: bool = True) -> list:
    """Install whatever is missing (asking first when ``ask``); returns what was missing.

    Raises DependencyError with a message for the user when something is still missing afterwards.
    """
    missing = missing_dependencies()
    if not missing:
        return []
    if testing_mode():
        raise DependencyError("install PyTorch first (the 'PyTorch' extension's PyTorch Util module), then "
                              + ", ".join(m for m in missing if m not in ("torch", "torchvision"))
                              + "; testing mode installs nothing: missing " + ", ".join(missing))
    if "torch" in missing or "torchvision" in missing:
        install_torch(ask)
    packages = [requirement for requirement in missing if requirement not in ("torch", "torchvision")]
    if packages:
        install_packages(packages, ask)
    still = missing_dependencies()
    if still:
        raise DependencyError("still missing (installation declined or failed): " + ", ".join(still)
                              + ". Restart Slicer and try again, or install them from the Python console.")
    return missing
