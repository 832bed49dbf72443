"""Layers import one way: a module imports only modules of its own layer or of the layers
below it, and no import cycle exists, counting imports inside functions too. pyvf
modules are imported inside a function only where they guard an optional dependency
(ALLOWED_INNER); third-party imports inside functions keep `import pyvf` light."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pyvf"

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS = [
    ("core", ["pyvf._native", "pyvf.kernels", "pyvf.packing", "pyvf.splice", "pyvf.options"]),
    ("ops", ["pyvf", "pyvf.ops"]),  # pyvf/__init__.py exposes the ops and build_info
    ("data", ["pyvf.data", "pyvf.chat", "pyvf.assets"]),
    ("runtime", ["pyvf.runtime"]),
    ("verify", ["pyvf.verify"]),
    ("objectives", ["pyvf.objectives", "pyvf.losses", "pyvf.rewards"]),
    ("train", ["pyvf.train"]),
    ("integrations", ["pyvf.integrations"]),
    ("workflows", ["pyvf.workflows", "pyvf.bench", "pyvf.assets.build_model", "pyvf.assets.build_tokenizer"]),
    ("cli", ["pyvf.cli", "pyvf.__main__"]),
]

# pyvf modules that may be imported inside a function: each guards an optional
# dependency, so only the code path that needs it imports it. The vLLM engine imports
# vllm; the Triton kernels import triton (absent on macOS and Windows, and switched to its
# interpreter by the tests before the first import).
ALLOWED_INNER = ("pyvf.runtime.rollout.vllm", "pyvf.kernels.triton")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{name} is in no layer of tests/test_imports.py"
    return best


def imports(path: Path, modules: set[str]):
    """(imported pyvf module, line, inside a function) for every import in `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, inner):
        for child in ast.iter_child_nodes(node):
            deeper = inner or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append((sub if sub in modules else base, child.lineno, inner))
            visit(child, deeper)

    visit(tree, False)
    return out


def graph():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return files, {name: imports(path, set(files)) for name, path in files.items()}


def test_every_import_goes_down_or_sideways():
    files, edges = graph()
    upward = []
    for name, found in edges.items():
        for target, line, _ in found:
            if target.startswith("pyvf") and layer_of(target) > layer_of(name):
                upward.append(f"{files[name].relative_to(ROOT.parent)}:{line} {name} "
                              f"({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    files, edges = graph()
    deps = {name: {t for t, _, _ in found if t in files and t != name} for name, found in edges.items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    deps = {n: {t for t in ts if not (t.startswith(n + ".") and files[n].name == "__init__.py")}
            for n, ts in deps.items()}
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(deps[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(deps):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_only_guard_optional_dependencies():
    files, edges = graph()
    inner = [f"{files[name].relative_to(ROOT.parent)}:{line} imports {target}"
             for name, found in edges.items() for target, line, is_inner in found
             if is_inner and target.startswith("pyvf")
             and not any(target == p or target.startswith(p + ".") for p in ALLOWED_INNER)]
    assert not inner, "imports inside functions that guard no optional dependency:\n" + "\n".join(inner)


def test_the_layer_table_names_real_modules():
    files, _ = graph()
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(n == prefix or n.startswith(prefix + ".") for n in files) or prefix == "pyvf.__main__", prefix
