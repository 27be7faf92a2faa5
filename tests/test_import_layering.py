"""The imports of mos_kernels go one way: no cycle among its modules (function-level imports
included), no op module reaching into another op module's private names or private modules, and
mos/ using only the kernels' public names.

Read from the source (ast), so a lazy import inside a function counts as much as a top-level one.
The package's __init__ is the top of the house (it imports every op to re-export it) and is left
out of the graph.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mos_kernels"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
# The modules that hold an op (its public function, reference, kernels, custom ops).
OP_MODULES = {"session_pool", "sessionize", "theme_dispatch", "theme_gather", "grouped_linear",
              "expert_target_attention", "jagged_self_attention"}
# Private modules that belong to one op; the other private modules (_alloc, _layout) serve every op.
PRIVATE_MODULE_OWNER = {"_padded_attention": "jagged_self_attention"}
# Modules that are not source files: the compiled CUDA extension (setup.py builds mos_kernels._C).
BINARY_MODULES = {"_C"}


def _op_of(module: str) -> str:
    """The op whose files a module is part of: an op's Triton kernels may sit in `<op>_kernels`."""
    stem = module[:-len("_kernels")] if module.endswith("_kernels") else module
    return stem if stem in OP_MODULES else module


def _imports(path: Path, package: str) -> Iterator[Tuple[str, List[str], int]]:
    """(imported module of `package`, the names taken from it, line) for every import in the file;
    "__init__" for the package itself (`import mos_kernels`, `from . import data_checks`)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package:
                    yield (parts[1] if len(parts) > 1 else "__init__"), [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and path.parent.name == package:
                base = node.module
            elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                base = ".".join(node.module.split(".")[1:]) or None
            else:
                continue
            names = [alias.name for alias in node.names]
            if base is None:       # from . import a, b: modules, or names the package re-exports
                for name in names:
                    if (REPO / package / f"{name}.py").exists() or name in BINARY_MODULES:
                        yield name, [], node.lineno
                    else:
                        yield "__init__", [name], node.lineno
            else:
                yield base.split(".")[0], names, node.lineno


def _graph() -> Dict[str, Set[str]]:
    graph = {}
    for module in MODULES:
        graph[module] = {target for target, _, _ in _imports(PACKAGE / f"{module}.py", "mos_kernels")
                         if target in MODULES and target != module}
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of the graph as a path (first == last), or []."""
    state: Dict[str, int] = {}          # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_kernel_modules():
    cycle = _cycle(_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_the_package_itself():
    """The package's __init__ imports every op: a module importing the package (or a name it
    re-exports) closes a cycle through it that the graph above leaves out."""
    wrong = [f"{module}.py:{line} imports the package ({names or 'mos_kernels'})" for module in MODULES
             for target, names, line in _imports(PACKAGE / f"{module}.py", "mos_kernels") if target == "__init__"]
    assert not wrong, "\n".join(wrong)


def test_the_import_reader_sees_package_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("import mos_kernels\nfrom mos_kernels import data_checks, jagged\n"
                      "def f():\n    from mos_kernels.routing import _hidden\n")
    found = sorted((target, tuple(names)) for target, names, _ in _imports(source, "mos_kernels"))
    assert found == [("__init__", ()), ("__init__", ("data_checks",)), ("jagged", ()), ("routing", ("_hidden",))]


def test_no_import_by_name_string():
    """importlib.import_module or __import__ would hide an edge from the graph above."""
    for module in MODULES:
        text = (PACKAGE / f"{module}.py").read_text()
        assert "import_module" not in text and "__import__" not in text, f"{module} imports by a name string"


def test_no_module_takes_private_names_of_another_op():
    wrong = []
    for module in MODULES:
        for target, names, line in _imports(PACKAGE / f"{module}.py", "mos_kernels"):
            if target == module:
                continue
            owner = PRIVATE_MODULE_OWNER.get(target)
            if owner is not None and _op_of(module) != owner:
                wrong.append(f"{module}.py:{line} imports {target}, private to {owner}")
            if _op_of(target) in OP_MODULES and _op_of(target) != _op_of(module):
                wrong += [f"{module}.py:{line} imports {target}.{name}" for name in names if name.startswith("_")]
    assert not wrong, "\n".join(wrong)


def test_mos_takes_only_public_kernel_names():
    wrong = []
    for path in sorted((REPO / "mos").rglob("*.py")):
        for target, names, line in _imports(path, "mos_kernels"):
            private = [name for name in names if name.startswith("_")]
            if (target.startswith("_") and target != "__init__") or private:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports mos_kernels.{target} {private}")
    assert not wrong, "\n".join(wrong)


# The layer package's files; __main__.py is the `python -m mos` command, run, never imported.
LAYER_FILES = sorted(p for p in (REPO / "mos").glob("*.py") if p.name != "__main__.py")


def test_the_layer_package_never_imports_the_lab():
    """mos/*.py (the layer, its config, boosting, DeLong) import nothing of mos.lab, even lazily."""
    wrong = []
    for path in LAYER_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{path.name}:{node.lineno} imports {name}" for name in names
                      if name.startswith(("mos.lab", ".lab")) or name == "mos.lab"
                      or (isinstance(node, ast.ImportFrom) and node.module in ("mos", None) and
                          any(alias.name == "lab" for alias in node.names))]
    assert not wrong, "\n".join(wrong)


def _loaded_after(statement: str) -> List[str]:
    """The modules of mos, mos_kernels, torch and the lab's libraries that `statement` loads in a
    fresh interpreter (torch itself brings tqdm, so tqdm says nothing)."""
    import subprocess
    import sys

    code = (f"{statement}; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mos', 'mos_kernels', 'torch', 'yaml', 'matplotlib', 'pyarrow')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout)


def test_import_mos_loads_nothing_until_a_name_is_used():
    """`import mos` is instant (the command line's --help and --version answer before torch loads)."""
    assert _loaded_after("import mos; mos.__version__") == ["mos"]


def test_the_layer_loads_the_layer_and_the_kernels_only():
    """`from mos import MoSLayer, MoSConfig, MoSOutput` brings the layer package and mos_kernels:
    no lab module, no YAML, plotting or Parquet library."""
    loaded = _loaded_after("from mos import MoSConfig, MoSLayer, MoSOutput")
    ours = [name for name in loaded if name.split(".")[0] in ("mos", "mos_kernels")]
    assert all(name == "mos" or name.startswith(("mos.", "mos_kernels")) for name in ours), ours
    assert not [name for name in ours if name.startswith("mos.lab")], ours
    assert {"mos.layer", "mos.config", "mos.encoders", "mos_kernels"} <= set(ours)
    assert not [name for name in loaded if name.split(".")[0] in ("yaml", "matplotlib", "pyarrow")], loaded


def test_the_lazy_names_are_the_public_ones():
    import mos
    from mos import config, layer

    assert mos.MoSLayer is layer.MoSLayer and mos.MoSConfig is config.MoSConfig
    assert set(mos.__all__) <= set(dir(mos))
    with pytest.raises(AttributeError, match="no attribute 'MosLayer'"):
        mos.MosLayer
    with pytest.raises(AttributeError, match="from mos.lab.model import CTRModel"):
        mos.CTRModel


def _package_graph(root: Path, package: str) -> Dict[str, Set[str]]:
    """Module (dotted, under `package`) -> the modules of `package` it imports, lazily or not
    (imports under `if TYPE_CHECKING:` never run, so they are no edge)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(inner) for block in ast.walk(tree)
                       if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                       for inner in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {target for target in found if target in modules and target != name}
        graph[name] = targets
    return graph


def test_no_import_cycle_in_the_mos_package():
    """Neither the layer nor the lab has an import cycle (function-level imports included); a
    package's __init__ re-exporting its modules is not an edge back to it."""
    graph = _package_graph(REPO / "mos", "mos")
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
