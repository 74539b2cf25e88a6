"""The package order of docs/architecture.md, read from the source with `ast`: every project import points
down (or within its own layer), and no function imports anything but the optional heavy libraries below."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the layer of the longest prefix that names it; it may import its own layer
# and any layer below, never one above.
LAYERS = [
    ("base", ["slimgpt_core.base"]),
    ("loading", ["slimgpt_core.models", "slimgpt_core.data"]),
    ("export", ["slimgpt_core.export"]),
    ("ratios", ["slimgpt_core.schedules.schedule"]),
    ("evaluation", ["slimgpt_core.evaluation"]),
    ("training", ["slimgpt_core.training"]),
    ("methods", ["slimgpt_core.methods"]),
    ("schedules", ["slimgpt_core.schedules"]),
    ("workspace", ["slimgpt_core.workspace"]),
    ("services", ["slimgpt_core.services"]),
    ("interfaces", ["slimgpt_core.cli", "slimgpt_core.__main__", "app", "ui", "studio_pages"]),
]
PROJECT = ("slimgpt_core", "ui", "studio_pages", "app")
# Imported inside the functions that need them: optional, or slow to import and needed by few commands.
OPTIONAL_INSIDE_FUNCTIONS = {"lm_eval", "peft", "datasets", "gguf", "llama_cpp", "plotly"}
# Exported checkpoints ship this file byte for byte as their remote code: its text stays as runs already ship it.
SHIPPED_AS_IS = {"slimgpt_core/base/modeling_slimgpt.py": {"transformers"}}
MAX_FUNCTION_LINES = 60
# The command line loads its commands (torch, the services) only once the arguments are read, so --help is fast.
LOADED_AFTER_PARSING = {"slimgpt_core/cli/__init__.py": {"slimgpt_core"}}


def layer_of(module: str) -> int | None:
    if module == "slimgpt_core":  # the empty top package: importing it imports nothing
        return 0
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def project_files(root: Path = ROOT) -> list[Path]:
    files = sorted((root / "slimgpt_core").rglob("*.py")) + sorted((root / "ui").rglob("*.py"))
    return files + sorted((root / "studio_pages").rglob("*.py")) + [root / "app.py"]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every import statement of the file."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                # `from package import module` names a module: count the deepest one
                found.extend((child.lineno, f"{module}.{alias.name}" if module == "slimgpt_core" or
                              (root / Path(*f"{module}.{alias.name}".split("."))).with_suffix(".py").exists()
                              else module, in_function) for alias in child.names)
            visit(child, inside)

    visit(tree, False)
    return found


def is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in project_files(root):
        here = module_name(path, root)
        mine = layer_of(here)
        if mine is None:
            found.append(f"{here}: in no layer of LAYERS")
            continue
        for line, module, inside in imports(path, root):
            where = f"{path.relative_to(root)}:{line}"
            relative = path.relative_to(root).as_posix()
            allowed = (OPTIONAL_INSIDE_FUNCTIONS | SHIPPED_AS_IS.get(relative, set())
                       | LOADED_AFTER_PARSING.get(relative, set()))
            if inside and module.split(".")[0] not in allowed:
                found.append(f"{where}: imports {module} inside a function")
            if is_project(module):
                theirs = layer_of(module)
                if theirs is None:
                    found.append(f"{where}: imports {module}, which is in no layer")
                elif theirs > mine:
                    found.append(f"{where}: {LAYERS[mine][0]} imports {module} from {LAYERS[theirs][0]}, above it")
    return found


def import_counts(root: Path = ROOT) -> tuple[int, int]:
    """(import statements in slimgpt_core that name a project module, of which inside functions): the numbers
    docs/architecture.md quotes."""
    statements = {}
    for path in sorted((root / "slimgpt_core").rglob("*.py")):
        for line, module, in_function in imports(path, root):
            if module.startswith("slimgpt_core"):
                statements[path, line] = in_function
    return len(statements), sum(statements.values())


def test_every_import_keeps_the_package_order():
    assert violations() == []


def test_every_module_has_a_layer_and_every_layer_a_module():
    names = [module_name(p) for p in project_files()]
    assert all(layer_of(n) is not None for n in names)
    assert {layer_of(n) for n in names} == set(range(len(LAYERS)))


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in ("ui", "studio_pages"):
        (root / folder).mkdir(exist_ok=True)
    (root / "app.py").touch()
    return root


@pytest.mark.parametrize("source, expected", [
    ("from slimgpt_core.workspace.store import runs_root\n",
     "slimgpt_core/base/x.py:1: base imports slimgpt_core.workspace.store from workspace, above it"),
    ("from slimgpt_core.workspace import store\n",
     "slimgpt_core/base/x.py:1: base imports slimgpt_core.workspace.store from workspace, above it"),
    ("def f():\n    from slimgpt_core.base import errors\n",
     "slimgpt_core/base/x.py:2: imports slimgpt_core.base.errors inside a function"),
    ("def f():\n    import json\n", "slimgpt_core/base/x.py:2: imports json inside a function"),
    ("class C:\n    def f(self):\n        import time\n", "slimgpt_core/base/x.py:3: imports time inside a function"),
])
def test_an_upward_or_function_level_import_is_named(tmp_path, source, expected):
    root = _write(tmp_path, {"slimgpt_core/__init__.py": "", "slimgpt_core/base/__init__.py": "",
                             "slimgpt_core/workspace/__init__.py": "", "slimgpt_core/workspace/store.py": "",
                             "slimgpt_core/base/errors.py": "", "slimgpt_core/base/x.py": source})
    assert violations(root) == [expected]


def test_allowed_imports_pass(tmp_path):
    root = _write(tmp_path, {
        "slimgpt_core/__init__.py": "", "slimgpt_core/base/__init__.py": "", "slimgpt_core/base/errors.py": "",
        "slimgpt_core/workspace/__init__.py": "",
        "slimgpt_core/workspace/store.py": "import json\nfrom slimgpt_core.base.errors import X\n"
                                           "from . import jobs\n\n\ndef f():\n    import lm_eval\n",
        "slimgpt_core/workspace/jobs.py": "from slimgpt_core.base import errors\n",
        "ui/page.py": "from slimgpt_core.workspace import store\n"})
    assert violations(root) == []
    assert import_counts(root) == (3, 0)


def test_a_relative_import_upward_is_caught(tmp_path):
    root = _write(tmp_path, {"slimgpt_core/__init__.py": "", "slimgpt_core/base/__init__.py": "",
                             "slimgpt_core/base/x.py": "from ..workspace.store import runs_root\n",
                             "slimgpt_core/workspace/__init__.py": "", "slimgpt_core/workspace/store.py": ""})
    assert violations(root) == [
        "slimgpt_core/base/x.py:1: base imports slimgpt_core.workspace.store from workspace, above it"]


def longest_functions(root: Path = ROOT, most: int | None = 10) -> list[tuple[int, str]]:
    """(lines, file:function) of the longest functions in slimgpt_core, decorators and docstrings included."""
    found = []
    for path in sorted((root / "slimgpt_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                found.append((node.end_lineno - start + 1, f"{path.relative_to(root)}:{node.name}"))
    return sorted(found, reverse=True)[:most]


def long_functions(root: Path = ROOT) -> list[str]:
    """Functions in slimgpt_core over MAX_FUNCTION_LINES lines (nested ones count inside their parent too)."""
    return [f"{name}: {lines} lines" for lines, name in longest_functions(root, most=None)
            if lines > MAX_FUNCTION_LINES]


def test_no_function_is_over_sixty_lines():
    assert long_functions() == []


def test_a_function_over_sixty_lines_is_named(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    root = _write(tmp_path, {
        "slimgpt_core/methods/x.py": f"def fits():\n{body}\n\ndef too_long():\n{body}    x = 0\n",
        "slimgpt_core/methods/y.py": f"@functools.cache\ndef decorated():\n{body}",  # the decorator's line counts
        "slimgpt_core/services/z.py": f"def longest():\n{body}    x = 0\n    y = 0\n"})
    assert long_functions(root) == ["slimgpt_core/services/z.py:longest: 62 lines",
                                    "slimgpt_core/methods/y.py:decorated: 61 lines",
                                    "slimgpt_core/methods/x.py:too_long: 61 lines"]


if __name__ == "__main__":  # the numbers for docs/architecture.md: python tests/test_layering.py
    total, inside = import_counts()
    print(f"{total} import statements of project modules in slimgpt_core, {inside} inside functions")
    for lines, name in longest_functions():
        print(f"{lines:4d}  {name}")
