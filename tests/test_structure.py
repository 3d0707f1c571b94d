"""The layout every op family follows (docs/index.md, "Adding an op family"), checked from the
registry: a family missing a part, or a kernel table outside the registry, fails here."""
import ast
import importlib
import pathlib

import pytest

from fastnotes import _registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = {family.name: family for family in _registry.FAMILIES}


def top_level_functions(path):
    """{name: decorator source list} of the functions a module defines at top level."""
    tree = ast.parse(path.read_text())
    return {node.name: [ast.unparse(d) for d in node.decorator_list]
            for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_has_every_part(name):
    family = FAMILIES[name]
    public = importlib.import_module(f"fastnotes.{family.module}")
    assert public.__doc__, f"fastnotes.{family.module} has no docstring"
    for backend in family.backends:
        path = ROOT / "kernels" / backend / f"{name}.py"
        assert path.is_file(), f"{name}: declared backend {backend} has no {path.relative_to(ROOT)}"
        missing = set(family.launchers) - set(top_level_functions(path))
        assert not missing, f"{path.relative_to(ROOT)} lacks the launchers {sorted(missing)}"
    for part in (f"fastnotes/reference/{name}.py", f"docs/{name}.md"):
        assert (ROOT / part).is_file(), f"{name}: missing {part}"
    assert f"({name}.md)" in (ROOT / "docs" / "index.md").read_text(), f"docs/index.md does not list {name}"
    selfcheck = importlib.import_module(f"fastnotes._selfcheck.{name}")
    assert selfcheck.CASES, f"{name}: fastnotes/_selfcheck/{name}.py has no CASES"


@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if "triton" in f.backends))
def test_every_triton_kernel_is_compiled_ahead_of_time(name):
    """Each launched @triton.jit function (public name; helpers start with _) has an AOT config."""
    pytest.importorskip("triton")
    path = ROOT / "kernels" / "triton" / f"{name}.py"
    kernels = {fn for fn, decorators in top_level_functions(path).items()
               if not fn.startswith("_") and any("triton.jit" in d for d in decorators)}
    configured = {config[0].fn.__name__ if hasattr(config[0], "fn") else config[0].__name__
                  for config in FAMILIES[name].kernels("triton").AOT_CONFIGS}
    assert kernels <= configured, f"kernels/triton/{name}.py: no AOT config for {sorted(kernels - configured)}"


def test_kernel_modules_belong_to_a_family():
    for backend in ("numba", "triton", "cuda"):
        for path in (ROOT / "kernels" / backend).glob("[!_]*.py"):
            family = FAMILIES.get(path.stem)
            assert family is not None and backend in family.backends, \
                f"{path.relative_to(ROOT)} is not declared in fastnotes/_registry.py"


def test_kernels_are_named_only_in_the_registry():
    """No string-keyed kernel tables: the public layer reaches kernels through _registry."""
    for path in (ROOT / "fastnotes").rglob("*.py"):
        if path.name == "_registry.py":
            continue
        text = path.read_text()
        assert "fastnotes.kernels." not in text and "import_module(_KERNELS" not in text, \
            f"{path.relative_to(ROOT)} names a kernel module by string"


def test_no_reference_leaves_the_repository():
    """Docstrings point to docs/, which ships with the code (../shared/specs does not)."""
    for path in [*ROOT.glob("fastnotes/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("csrc/*")]:
        assert "specs/" not in path.read_text(), f"{path.relative_to(ROOT)} points to specs/"


def test_tests_do_not_import_each_other():
    """Shared test code lives in oracle.py and the <family>_cases.py modules, never in a test file."""
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not any(name.startswith("test_") for name in names), f"tests/{path.name} imports {names}"
