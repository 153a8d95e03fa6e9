"""Installing torch and the small packages from the Slicer module, on REAL slicer-core.

Slicer's installers are not in slicer-core, so they are MOCKS here, shaped after Slicer 5.12's behaviour:
``slicer.packaging.pip_ensure`` (raises RuntimeError when the user declines), SlicerPyTorch's
``PyTorchUtils.PyTorchUtilsLogic.installTorch`` (raises CalledProcessError when pip fails). ``missing``
pretends packages are absent (they are all installed here).
"""

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from slicer_scene import module, slicer  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = {re.match(r"[\w.-]+", line).group(0): line for line in
                (line.split("#")[0].strip() for line in (ROOT / "ProbSAMLib" / "requirements.txt").read_text().splitlines())
                if line}


@pytest.fixture
def installers(slicer, module, monkeypatch):
    """Mock installers that record their calls; torch and segment_anything reported missing."""
    calls = []
    deps = sys.modules["ProbSAMSlicerLib.dependencies"]
    missing = {"torch", "segment_anything"}
    monkeypatch.setattr(deps, "_importable", lambda name: name not in missing)

    class Logic:  # MOCK of PyTorchUtils.PyTorchUtilsLogic
        result = "torch"

        def installTorch(self, **kwargs):
            calls.append(("installTorch", kwargs))
            if isinstance(Logic.result, Exception):
                raise Logic.result
            missing.discard("torch")
            return Logic.result

    def pip_ensure(requirements, **kwargs):  # MOCK of slicer.packaging.pip_ensure
        calls.append(("pip_ensure", list(requirements), kwargs))
        if kwargs.get("prompt_install") and installers_state["decline"]:
            raise RuntimeError("user declined")
        missing.discard("segment_anything")

    installers_state = {"decline": False}
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=pip_ensure))
    slicer.app.testing = False
    return types.SimpleNamespace(calls=calls, torch=Logic, state=installers_state, deps=deps)


def test_testing_mode_installs_nothing_and_says_install_pytorch_first(module, installers, slicer):
    slicer.app.testing = True
    with pytest.raises(installers.deps.DependencyError, match="install PyTorch first"):
        module.ProbSAMSlicerLogic.ensureDependencies(ask=True)
    assert installers.calls == []


def test_missing_packages_go_to_pytorch_utils_then_pip_ensure(module, installers):
    assert module.ProbSAMSlicerLogic.ensureDependencies(ask=True) == ["torch", "segment-anything>=1.0"]
    assert [c[0] for c in installers.calls] == ["installTorch", "pip_ensure"]
    assert installers.calls[0][1]["askConfirmation"] and installers.calls[1][2]["requester"] == "ProbSAMSlicer"
    # the versions come from ProbSAMLib/requirements.txt, the pip package's list
    versions = (installers.calls[0][1]["torchVersionRequirement"], installers.calls[0][1]["torchvisionVersionRequirement"])
    assert versions == tuple(REQUIREMENTS[name][len(name):] for name in ("torch", "torchvision")) and versions[0]


def test_the_list_is_probsamlib_requirements_txt(module, installers, monkeypatch):
    """Everything the pip package requires is checked, by its import name; nothing else is."""
    checked = []
    monkeypatch.setattr(installers.deps, "_importable", lambda name: checked.append(name) and False)
    missing = module.ProbSAMSlicerLogic.missingDependencies()
    assert "PIL" in checked and "segment_anything" in checked and "SimpleITK" in checked
    assert missing == ["torch", "torchvision"] + [r for name, r in REQUIREMENTS.items() if name not in ("torch", "torchvision")]
    imports = {name: module_name for name, module_name, _ in installers.deps.read_requirements()}
    assert imports["segment-anything"] == "segment_anything" and imports["pillow"] == "PIL"
    assert installers.deps.requirements_path() == ROOT / "ProbSAMLib" / "requirements.txt"


def test_failed_torch_install_is_a_clear_error(module, installers):
    installers.torch.result = subprocess.CalledProcessError(1, ["pip", "install", "torch"])
    with pytest.raises(installers.deps.DependencyError, match="installing PyTorch failed.*PyTorch Util"):
        module.ProbSAMSlicerLogic.ensureDependencies(ask=True)


def test_declined_package_install_is_a_clear_error(module, installers):
    installers.state["decline"] = True
    with pytest.raises(installers.deps.DependencyError, match="declined"):
        module.ProbSAMSlicerLogic.ensureDependencies(ask=True)


def test_older_slicer_confirms_then_pip_installs(module, installers, slicer, monkeypatch):
    monkeypatch.delitem(sys.modules, "slicer.packaging")
    monkeypatch.setattr(installers.deps, "_package_installer", lambda: None)  # no pip_ensure before 5.12
    answers = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: answers.append(a) or False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: installers.calls.append(("pip_install", a)))
    with pytest.raises(installers.deps.DependencyError, match="declined"):
        module.ProbSAMSlicerLogic.ensureDependencies(ask=True)
    assert answers and ("pip_install",) not in [c[:1] for c in installers.calls]


def test_remote_mode_needs_no_pytorch(module, installers):
    """A laptop that samples on a server installs nothing of PyTorch (the worker only relays the job:
    numpy and the standard library, checked by test_server's relay through a worker without torch)."""
    assert module.ProbSAMSlicerLogic.missingDependencies(remote=True) == []
    assert module.ProbSAMSlicerLogic.ensureDependencies(ask=True, remote=True) == []
    assert installers.calls == []
    assert module.ProbSAMSlicerLogic.missingDependencies() == ["torch", "segment-anything>=1.0"]  # local mode
