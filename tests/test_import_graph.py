"""The package's import graph, function-level imports included: no cycles, and every import reads
down the layers

    entry points and tools -> vLLM patches -> flags -> config -> methods -> backend -> eviction
    -> kernels (decode dispatch -> CUDA decode -> Triton kernels; reference/ beside them) -> foundation

A module may import from its own layer and the layers below; `reference/` (the kernels' PyTorch
oracle) and the kernels never import each other. Imports under `if TYPE_CHECKING:` count too.
Modules loaded by dotted-path strings (vLLM's backend registration, entry points, the CLI's
subcommands) are not edges: nothing of the package is loaded that way from below.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vllm_kvpress"
SOURCES = {PACKAGE: ROOT / "vllm_kvpress", f"{PACKAGE}.triton_kernels": ROOT / "triton_kernels"}
"""Where each package's modules live in the checkout (setup.py installs triton_kernels/ into the package)."""

LAYERS = (
    ("entry points and tools", ("vllm_kvpress.plugin", "vllm_kvpress.cli", "vllm_kvpress.method_list",
                                "vllm_kvpress.eval", "vllm_kvpress.bench", "vllm_kvpress.soak",
                                "vllm_kvpress.convert")),
    ("vLLM patches", ("vllm_kvpress.vllm_patches",)),
    ("flags and tool support", ("vllm_kvpress.engine_args", "vllm_kvpress.models", "vllm_kvpress.provenance")),
    ("config", ("vllm_kvpress.config",)),
    ("methods", ("vllm_kvpress.methods",)),
    ("backend", ("vllm_kvpress.backend",)),
    ("eviction", ("vllm_kvpress.eviction",)),
    ("decode dispatch", ("vllm_kvpress.decode",)),
    ("CUDA decode", ("vllm_kvpress.cuda_decode", "vllm_kvpress.csrc")),
    ("Triton kernels", ("vllm_kvpress.triton_kernels",)),
    ("reference", ("vllm_kvpress.reference",)),
    ("foundation", ("vllm_kvpress.layout", "vllm_kvpress.headwise_layout", "vllm_kvpress.encoding",
                    "vllm_kvpress.errors", "vllm_kvpress")),
)
"""Top to bottom. A module belongs to the layer of its longest matching prefix."""
SIBLINGS = (("vllm_kvpress.reference", ("vllm_kvpress.decode", "vllm_kvpress.cuda_decode",
                                        "vllm_kvpress.triton_kernels")),)
"""(a, bs): a and each of bs import nothing of each other, although their layers are ordered."""


def module_files() -> dict[str, Path]:
    modules = {}
    for package, directory in SOURCES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if package == PACKAGE and name.startswith(f"{PACKAGE}.triton_kernels"):
                continue  # not in the source tree's package
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (module-level or inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports the module; `from module import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a package path, or a name in a module
                target = target.rpartition(".")[0]
            if target and target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    if index is None:
        raise AssertionError(f"{module} is in no layer of tests/test_import_graph.py")
    return index


def in_component(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) < layer_of(module):
                wrong.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
            for a, others in SIBLINGS:
                for b in others:
                    if (in_component(module, a) and in_component(target, b)) or (
                            in_component(module, b) and in_component(target, a)):
                        wrong.append(f"{module} imports {target}: {a} and {b} must not import each other")
    return wrong


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("X = 1\n")
    (package / "high.py").write_text("def f():\n    from . import low\n    from .low import X\n")
    known = {"pkg", "pkg.low", "pkg.high"}
    # the checker keeps package modules only; name the fake package like ours for the check
    found = imports_of("vllm_kvpress.high", package / "high.py", {"vllm_kvpress", "vllm_kvpress.low",
                                                                  "vllm_kvpress.high"})
    assert found == {"vllm_kvpress.low"} and known


def test_the_checks_fail_on_a_cycle_and_on_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    wrong = upward_imports({"vllm_kvpress.layout": {"vllm_kvpress.methods.base"}})
    assert wrong and "foundation" in wrong[0] and "methods" in wrong[0]
    assert upward_imports({"vllm_kvpress.triton_kernels.cache_write": {"vllm_kvpress.reference.gear"}})


def test_every_module_is_in_a_layer(graph):
    for module in graph:
        layer_of(module)
    assert "vllm_kvpress.triton_kernels.cache_write" in graph and "vllm_kvpress.methods.snapkv" in graph


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_imports_read_down_the_layers(graph):
    assert upward_imports(graph) == []
