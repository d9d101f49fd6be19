"""The house: the scripts a user runs at the top, the library in tuning/, layers that hold, no import circles, and
a --help that loads no torch. The imports are read with ast (every import, at the top or inside a function), not
by running the modules."""

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = ("datasetup", "model", "train", "reward", "align", "constitution", "inference", "evaluation")
# Floors, from the ground up: a module imports only from its own floor or below. The scripts sit on top.
FLOORS = {"tuning.cli": 0, "tuning.rundir": 0, "tuning.data": 1, "tuning.models": 2, "tuning.smoke": 2,
          "tuning.generation": 3, "tuning.runs": 3, "tuning.preference": 4}
TRAINING = ("tuning.runs", "tuning.preference", "train", "reward", "align")  # what generation never imports
GENERATION = ("tuning.generation", "inference", "evaluation")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for the scripts and every module of the package."""
    found = {name: ROOT / f"{name}.py" for name in SCRIPTS}
    for path in sorted((ROOT / "tuning").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = project_modules()


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, module) for each import of a project module in `path` (the module `module`), wherever it stands in
    the file; relative imports resolved."""
    found = []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:  # `from tuning.data import records` imports the module tuning.data.records
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if name in MODULES else base))
    return [(line, name) for line, name in found if name in MODULES]


GRAPH = {name: imports_of(path, name) for name, path in MODULES.items()}


def floor(name: str) -> int:
    return next((level for prefix, level in FLOORS.items() if name == prefix or name.startswith(prefix + ".")),
                99 if name in SCRIPTS else 0)


def where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(ROOT)}:{line}"


def test_the_top_level_holds_the_scripts_and_no_other_python():
    assert sorted(path.stem for path in ROOT.glob("*.py")) == sorted(SCRIPTS)


def test_no_module_imports_one_above_it_or_a_script():
    wrong = [f"{where(name, line)} imports {target} (floor {floor(target)}) from floor {floor(name)}"
             for name in MODULES if name not in SCRIPTS for line, target in GRAPH[name]
             if target in SCRIPTS or floor(target) > floor(name)]
    assert not wrong, "\n".join(wrong)


def test_generation_and_evaluation_import_no_training_code():
    wrong = [f"{where(name, line)} imports {target}" for name in MODULES if name.startswith(GENERATION)
             for line, target in GRAPH[name] if target.startswith(TRAINING)]
    assert not wrong, "\n".join(wrong)


def test_the_web_page_imports_generation_and_not_the_other_way():
    assert "tuning.generation.generate" in {target for _, target in GRAPH["tuning.generation.web"]}
    wrong = [f"{where(name, line)} imports the web page" for name in MODULES if name != "inference"
             for line, target in GRAPH[name] if target == "tuning.generation.web"]
    assert not wrong, "\n".join(wrong)  # (inference.py's --web dispatches to it)


def circle_through(start: str) -> list[str] | None:
    """An import circle back to `start` (the modules in order), if there is one."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        name, path = stack.pop()
        for _, target in GRAPH[name]:
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                stack.append((target, path + [target]))
    return None


def test_no_import_circles():
    circles = {" -> ".join(circle) for name in MODULES if (circle := circle_through(name))}
    assert not circles, "import circles:\n" + "\n".join(sorted(circles))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast_and_loads_no_torch(script):
    """--help (and a refused flag, which stops at the same place) must not wait for torch to load."""
    probe = ("import runpy, sys; sys.argv = [sys.argv[1], '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe, str(ROOT / f"{script}.py")], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and result.stdout.strip().endswith("False"), f"{script}.py --help imports torch"
    assert seconds < 3, f"{script}.py --help took {seconds:.1f} s"


def test_the_readmes_layout_section_matches_the_tree():
    """Every module of the package is named in the README's layout table, under its own folder, and the table
    names no module that is not there."""
    import re

    section = (ROOT / "README.md").read_text().split("## How the code is laid out")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    named = set()
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        folder = cells[1].strip("`") if len(cells) == 3 and cells[1].startswith("`") and cells[1].endswith("/`") else ""
        found = re.findall(r"`(\w+\.py)`", cells[-1] if folder else " ".join(cells[:2]))
        named |= {folder + name for name in found if not (folder and name[:-3] in SCRIPTS)}  # (a script mentioned)
    modules = {str(path.relative_to(ROOT / "tuning")) for path in (ROOT / "tuning").rglob("*.py")
               if path.name != "__init__.py"}
    scripts = {f"{name}.py" for name in SCRIPTS}
    assert named - scripts == modules, (sorted(modules - named), sorted(named - scripts - modules))
    assert scripts <= named
