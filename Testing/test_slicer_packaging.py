"""The Slicer extension's files agree with each other and with the file tree (no Slicer needed).

- the widget's .ui: every SlicerParameterName is a parameter of ProbSAMSlicerParameterNode and every
  parameter is bound; every ``self.ui.<name>`` the widget code uses is an objectName in the .ui;
- ProbSAMSlicer.s4ext has every field, non-empty; ProbSAMSlicer.json is a valid ExtensionsIndex entry;
- the CMake lists name files that exist, and every ProbSAMLib .py and data file is installed.
"""

import ast
import json
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "ProbSAMSlicer"
UI_FILE = MODULE / "Resources" / "UI" / "ProbSAMSlicer.ui"
S4EXT_FIELDS = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled")


def ui_widgets() -> dict:
    """objectName -> {"class": ..., "param": SlicerParameterName or None} for every widget in the .ui."""
    widgets = {}
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        param = None
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                param = prop.find("string").text
        widgets[widget.get("name")] = {"class": widget.get("class"), "param": param}
    return widgets


def parameter_names() -> set:
    """Annotated fields of ProbSAMSlicerParameterNode, read from the source (no Slicer import needed)."""
    tree = ast.parse((MODULE / "ProbSAMSlicer.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ProbSAMSlicerParameterNode")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def cmake_list(text: str, variable: str) -> list:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...) in CMakeLists.txt"
    return match.group(1).split()


# --- the .ui ------------------------------------------------------------------------------------------
def test_every_parameter_is_bound_in_the_ui_and_vice_versa():
    bound = {w["param"] for w in ui_widgets().values() if w["param"]}
    assert bound == parameter_names()


def test_widget_code_uses_only_names_the_ui_defines():
    source = (MODULE / "ProbSAMSlicer.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    widgets = ui_widgets()
    assert used, "the widget uses no ui names?"
    assert used <= set(widgets), f"missing in the .ui: {sorted(used - set(widgets))}"
    for name in ("sampleButton", "cancelButton", "progressBar", "resultsTable", "sampleSpinBox"):
        assert name in used


def test_ui_names_are_unique_and_node_selectors_are_typed():
    names = [w.get("name") for w in ElementTree.parse(UI_FILE).iter("widget")]
    assert len(names) == len(set(names))
    tree = ElementTree.parse(UI_FILE)
    types = {w.get("name"): [s.text for s in w.iter("string")] for w in tree.iter("widget")
             if w.get("class") == "qMRMLNodeComboBox"}
    assert "vtkMRMLScalarVolumeNode" in types["inputVolumeSelector"]
    assert "vtkMRMLMarkupsROINode" in types["roiSelector"]


# --- extension description ----------------------------------------------------------------------------
def test_s4ext_has_every_field_filled():
    fields = {}
    for line in (ROOT / "ProbSAMSlicer.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    for key in S4EXT_FIELDS:
        assert fields.get(key), f".s4ext field {key} is missing or empty"
    assert fields["category"] == "Segmentation" and fields["depends"] == "PyTorch"
    assert "not for clinical use" in fields["description"]


def test_extensions_index_json_entry():
    entry = json.loads((ROOT / "ProbSAMSlicer.json").read_text(encoding="utf-8"))
    for key in ("$schema", "category", "scm_url", "scm_revision", "build_dependencies", "build_subdirectory", "tier"):
        assert key in entry and entry[key] not in ("", None), key
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Segmentation"
    assert entry["scm_url"].removesuffix(".git").split("/")[-1].startswith("Slicer")  # index rule: repo name
    assert not "ProbSAMSlicer".startswith("Slicer")  # index rule: extension name must not


def test_top_level_cmake():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(ProbSAMSlicer\)", text)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({var} "[^"]+"\)', text), var
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(ProbSAMSlicer)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    assert 'EXTENSION_DEPENDS "PyTorch"' in text and "Apache-2.0" in text and "rendered" in text
    assert (ROOT / "LICENSE").is_file()


def test_module_cmake_lists_exist_and_cover_the_module():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_GENERIC_TESTS" in text and "slicerMacroBuildScriptedModule" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text  # the self-test in CTest
    scripts = [s.replace("${MODULE_NAME}", "ProbSAMSlicer") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [s.replace("${MODULE_NAME}", "ProbSAMSlicer") for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    for path in scripts + resources:
        assert (MODULE / path).is_file(), path
    module_py = {str(p.relative_to(MODULE)) for p in MODULE.glob("**/*.py") if "Resources" not in p.parts}
    assert set(scripts) == module_py


def test_module_cmake_installs_all_of_probsamlib():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = cmake_list(text, "PROBSAMLIB_PYTHON_SCRIPTS")
    on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ProbSAMLib").rglob("*.py")
                     if "__pycache__" not in p.parts)
    assert sorted(listed) == on_disk, "ProbSAMSlicer/CMakeLists.txt PROBSAMLIB_PYTHON_SCRIPTS is out of date"
    data = cmake_list(text, "PROBSAMLIB_DATA_FILES")
    # every other file but the weights (globbed below) and their model card: data/, requirements.txt
    data_on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ProbSAMLib").rglob("*")
                          if p.is_file() and p.suffix not in (".py", ".pyc")
                          and not {"__pycache__", "models"} & set(p.relative_to(ROOT).parts))
    assert sorted(data) == data_on_disk
    assert "ProbSAMLib/requirements.txt" in data  # dependencies.py reads it in the installed extension
    for cmake in (ROOT / "CMakeLists.txt", MODULE / "CMakeLists.txt"):  # the extension ships no tests or tools
        code = "\n".join(line.split("#")[0] for line in cmake.read_text(encoding="utf-8").splitlines())
        assert not re.search(r"\b(Training|research|Testing)\b", code), cmake
    assert "${PROBSAMLIB_SOURCE_DIR}/ProbSAMLib/models/*.safetensors" in text  # bundled weights, when present
    assert "SOURCE_DIR ${PROBSAMLIB_SOURCE_DIR}" in text and "NO_INSTALL_SUBDIR" in text
    assert "set(PROBSAMLIB_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/..)" in text  # the repository root


def test_the_dependency_list_has_one_home():
    """ProbSAMLib/requirements.txt is the pip package's dependency list (pyproject.toml reads it) and the
    Slicer module's (dependencies.py reads it at run time); neither writes the list out a second time."""
    project = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # no tomllib before Python 3.11
    assert 'dynamic = ["dependencies"]' in project and not re.search(r"^dependencies\s*=\s*\[", project, re.M)
    assert 'dependencies = { file = ["ProbSAMLib/requirements.txt"] }' in project
    assert '"ProbSAMLib" = ["requirements.txt"]' in project
    source = (MODULE / "ProbSAMSlicerLib" / "dependencies.py").read_text(encoding="utf-8")
    assert not re.search(r"[\"'](segment-anything|safetensors|platformdirs)[<>=]", source)
    lines = [line.split("#")[0].strip() for line in (ROOT / "ProbSAMLib" / "requirements.txt").read_text().splitlines()]
    names = [re.match(r"[\w.-]+", line).group(0) for line in lines if line]
    assert names[:3] == ["torch", "torchvision", "segment-anything"] and "safetensors" in names


def test_icon_is_a_128px_png():
    data = (MODULE / "Resources" / "Icons" / "ProbSAMSlicer.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


@pytest.mark.parametrize("phrase", ["not for clinical use", "rendered phantom", "research model", "LiteMedSAM"])
def test_help_text_says_what_the_model_is_not(phrase):
    source = (MODULE / "ProbSAMSlicer.py").read_text(encoding="utf-8")
    help_text = source.split("helpText = _(")[1].split("acknowledgementText")[0]
    assert phrase in re.sub(r'"\s+"', "", help_text).replace("<i>", "").replace("</i>", "").replace("<b>", "").replace("</b>", "")


def test_screenshot_urls_point_at_files_that_exist():
    """The extension's screenshot (CMakeLists.txt, .s4ext) is a picture in this repository: the slice views
    rendered on slicer-core by ProbSAMSlicer/Resources/Scripts/render_slice_views.py."""
    cmake = re.search(r'EXTENSION_SCREENSHOTURLS "([^"]+)"', (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    s4ext = re.search(r"^screenshoturls (.+)$", (ROOT / "ProbSAMSlicer.s4ext").read_text(encoding="utf-8"), re.M)
    urls = cmake.group(1).split() + s4ext.group(1).split()
    assert urls
    for url in urls:
        path = ROOT / url.split("/main/", 1)[1]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
