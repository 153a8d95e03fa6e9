"""The pip package (pyproject.toml) ships what `pip install` users need, and builds without warnings.

The wheel is built for real, with the setuptools of the test environment, from a copy of the project
(so no build/ or .egg-info folder is left in the checkout): every bundled demo model and data file is in
it, the licence is declared as an SPDX expression with its file, and setuptools does not warn (its
"Package would be ignored" and licence-table warnings are the deprecations that become build errors).
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ProbSAMLib.weights import registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple:
    pytest.importorskip("setuptools", minversion="77")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    # the folders beside ProbSAMLib too, so a package list that picked them up would show in the wheel
    for name in ("ProbSAMLib", "Training", "research", "Testing", "ProbSAMSlicer"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                            str(source), "-w", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = out.glob("probsamslicer-*.whl")
    return zipfile.ZipFile(path), build.stdout + build.stderr


def test_wheel_ships_every_bundled_model_and_data_file(wheel):
    archive, _ = wheel
    names = set(archive.namelist())
    for folder in ("models", "data"):
        for path in (ROOT / "ProbSAMLib" / folder).iterdir():
            assert f"ProbSAMLib/{folder}/{path.name}" in names, f"{path.name} is missing from the wheel"
    for entry in registry.MANIFEST.values():
        if entry.bundled:
            info = archive.getinfo(f"ProbSAMLib/models/{entry.filename}")
            assert info.file_size == entry.size, entry.name
    assert "ProbSAMLib/app/cli.py" in names
    # every module: a subpackage missing from pyproject.toml's explicit package list would be left out
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ProbSAMLib").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)
    assert not any(n.startswith(("Training/", "Testing/", "research/", "ProbSAMSlicer/")) for n in names)
    assert {n.split("/")[0] for n in names} == {"ProbSAMLib"} | {n.split("/")[0] for n in names if ".dist-info/" in n}


def test_wheel_requires_what_probsamlib_requirements_lists(wheel):
    """The dependency list has one home, ProbSAMLib/requirements.txt (also read by the Slicer module): the
    wheel ships it and declares exactly its requirements."""
    archive, _ = wheel
    listed = [line.split("#")[0].strip() for line in (ROOT / "ProbSAMLib" / "requirements.txt").read_text().splitlines()]
    listed = [line for line in listed if line]
    metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in required if "extra ==" not in r] == listed
    assert archive.read("ProbSAMLib/requirements.txt").decode() == (ROOT / "ProbSAMLib" / "requirements.txt").read_text()


def test_wheel_declares_its_licence_and_builds_without_setuptools_warnings(wheel):
    archive, log = wheel
    metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    assert "Package would be ignored" not in log
    assert "BuildBackendWarning" not in log and "SetuptoolsDeprecationWarning" not in log, log[-3000:]
