"""The project as a package: pyproject.toml against requirements*.txt, the `slimgpt` console script against
`python -m slimgpt_core`, and a test suite that finds its imports without editing sys.path."""
import ast
import importlib
import os
import subprocess
import sys
import tomllib

from tests import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_lines(name: str) -> list[str]:
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    return sorted(line for line in lines if line)


def test_dependencies_are_the_requirements_files():
    assert sorted(PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]) == \
        requirement_lines("requirements.txt")
    assert sorted(PROJECT["optional-dependencies"]["dev"]) == requirement_lines("requirements-dev.txt")


def test_console_script_prints_what_python_m_slimgpt_core_prints():
    module, function = PROJECT["scripts"]["slimgpt"].split(":")
    # what the installed `slimgpt` wrapper runs: sys.exit(<function>())
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["--help"], ["prune", "--help"], ["no-such-command"]):
        as_script = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                                   env=env, timeout=300)
        as_module = subprocess.run([sys.executable, "-m", "slimgpt_core", *args], capture_output=True, text=True,
                                   cwd=ROOT, env=env, timeout=300)
        assert (as_script.returncode, as_script.stdout, as_script.stderr) == \
            (as_module.returncode, as_module.stdout, as_module.stderr), args
        assert "prune" in as_module.stdout + as_module.stderr


def test_the_package_is_slimgpt_core_alone():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["slimgpt_core", "slimgpt_core.*"]
    assert importlib.import_module("slimgpt_core").__file__ == str(ROOT / "slimgpt_core" / "__init__.py")


def test_no_test_file_edits_sys_path():
    """Helpers are imported as tests.<module>; pytest puts the repository root on sys.path (prepend import mode,
    every test folder a package)."""
    edits = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "path" and isinstance(node.value.value, ast.Name) and \
                    node.value.value.id == "sys" and node.attr in ("insert", "append", "extend"):
                edits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert edits == []
    folders = {p.parent for p in (ROOT / "tests").rglob("test_*.py")}
    assert folders and all((folder / "__init__.py").exists() for folder in folders)


def test_the_files_the_suite_starts_first_exist():
    from tests.conftest import LONGEST_FIRST
    assert [name for name in LONGEST_FIRST if not (ROOT / "tests" / name).is_file()] == []
