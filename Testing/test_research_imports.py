"""research/ is a folder of analysis tools, not tested by CI (their tests are research/tests); this only checks
that every tool still imports against the current ProbSAMLib and Training, so a rename there cannot leave a
tool behind unnoticed."""
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted(".".join(path.relative_to(ROOT / "research").with_suffix("").parts)
               for pattern in ("*.py", "tools/*.py") for path in (ROOT / "research").glob(pattern))


def test_there_are_tools_to_check():
    assert TOOLS


@pytest.mark.parametrize("tool", TOOLS)
def test_the_research_tool_imports(tool):
    module = importlib.import_module(f"research.{tool}")
    assert callable(getattr(module, "main", None)), f"research/{tool.replace('.', '/')}.py has no main()"
