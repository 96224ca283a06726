"""The house's layer rules (DESIGN.md), checked by reading every module's imports.

A module may import only from its own layer and the layers MAY_IMPORT lists for it; the
layers that HTTP and the engine loop stand on (api, engine, the shared types) import no
torch or numpy; and no module takes another module's private (underscore) names, by
`from m import _x` or by `m._x`. The checker runs on source text, so the second half of
this file shows it failing on small made-up modules that break each rule.
"""
from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "textmill"

# Module (or package) -> layer; the longest matching prefix wins ("textmill" itself only
# names the package's __init__, so a new top-level module must be placed here).
LAYER_OF = {
    "textmill": "types",
    "textmill.config": "types",
    "textmill.linear_attention": "types",  # a field of ModelConfig
    "textmill.messages": "types",
    "textmill.sampling_params": "types",
    "textmill.structured": "types",
    "textmill.collector": "types",  # the garbage collector paused at start-up: stdlib only
    "textmill.kernels": "kernels",
    "textmill.models": "models",
    "textmill.loader": "loader",
    "textmill.tokenizer": "tokenizer",
    "textmill.grammar": "grammar",
    "textmill.runner": "runner",
    "textmill.engine": "engine",
    "textmill.api": "api",
    "textmill.wiring": "wiring",
    "textmill.commands": "commands",
    "textmill.cli": "entry",
    "textmill.scale": "entry",
}

# DESIGN.md: api -> engine -> (Runner protocol) <- runner -> models, runner -> loader.
# The types that cross layers (configs, messages, sampling params) are below everything.
# The loader builds the module its tensors fill (models/registry), and reads the GGUF
# vocabularies the tokenizer turns into a Tokenizer. The engine talks to the runner only
# through a protocol and to the tokenizer through one; api reaches neither. wiring, the
# composition root, joins them all; commands run it. On top, the entry points: cli (which
# parses arguments into configs) and the Ray Serve deployment (scale/, which reuses cli's
# parser and is started by one of its commands); nothing below imports either.
BELOW_RUNNER = {"types", "kernels", "models", "loader", "tokenizer", "grammar"}
MAY_IMPORT: Mapping[str, frozenset[str]] = {
    "types": frozenset(),
    "kernels": frozenset({"types"}),
    "models": frozenset({"types"}),
    "loader": frozenset({"types", "models"}),
    "tokenizer": frozenset({"types", "loader"}),
    "grammar": frozenset({"types", "tokenizer"}),
    "runner": frozenset(BELOW_RUNNER),
    "engine": frozenset({"types"}),
    "api": frozenset({"types", "engine"}),
    "wiring": frozenset(BELOW_RUNNER | {"runner", "engine", "api"}),
    "commands": frozenset({"types", "wiring", "api"}),
    "entry": frozenset(BELOW_RUNNER | {"runner", "engine", "api", "wiring", "commands"}),
}
NO_TENSORS = frozenset({"types", "engine", "api"})  # may not import these libraries
TENSOR_LIBRARIES = frozenset({"torch", "numpy"})


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    rule: str  # "layer" | "tensors" | "private" | "cycle"
    detail: str


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts == ["textmill"]:
        return LAYER_OF["textmill"]
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:n])]
    return None


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, is_package: bool, tree: ast.AST):
    """(line, imported module, imported name or None) for every import, nested or not
    (TYPE_CHECKING and function-level imports are dependencies too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None, alias.asname or alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            for alias in node.names:
                yield node.lineno, source, alias.name, alias.asname or alias.name


def check(sources: Mapping[str, str], packages: frozenset[str] = frozenset()) -> list[Violation]:
    """Every rule broken by `sources` (module name -> source text); `packages` names the
    modules that are packages' __init__ files (their relative imports start inside them)."""
    found: list[Violation] = []
    for module, text in sorted(sources.items()):
        layer = layer_of(module)
        if layer is None:
            found.append(Violation(module, 1, "layer", f"{module} has no layer in LAYER_OF"))
        tree = ast.parse(text)
        module_names: dict[str, str] = {}  # local name -> textmill module it is bound to
        for line, source, name, local in _imports(module, module in packages, tree):
            target = source if name is None else f"{source}.{name}"
            top = source.split(".")[0]
            if top in TENSOR_LIBRARIES and layer in NO_TENSORS:
                found.append(Violation(module, line, "tensors", f"{layer} imports {source}"))
            if top != "textmill":
                continue
            # `from textmill.runner import qlinear` imports a module: its layer is the target's.
            theirs = layer_of(target if target in sources else source)
            if theirs is None:
                found.append(Violation(module, line, "layer", f"{source} has no layer in LAYER_OF"))
            elif layer is not None and theirs != layer and theirs not in MAY_IMPORT[layer]:
                found.append(Violation(module, line, "layer", f"{layer} imports {theirs} ({target})"))
            if name is not None and _private(name) and source != module:
                found.append(Violation(module, line, "private", f"takes {source}.{name}"))
            if name is None or target in sources:
                module_names[local] = target if name is not None else source
        for node in ast.walk(tree):  # m._x on a module imported above
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in module_names):
                found.append(Violation(module, node.lineno, "private",
                                       f"uses {module_names[node.value.id]}.{node.attr}"))
    return found + _cycles(sources, packages)


def _cycles(sources: Mapping[str, str], packages: frozenset[str]) -> list[Violation]:
    """Modules below the entry points that import one another in a ring, lazily or not
    (imports under TYPE_CHECKING never run and do not count): one violation per ring."""
    graph: dict[str, set[str]] = {}
    for module, text in sources.items():
        if layer_of(module) == "entry":
            continue
        tree = ast.parse(text)
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                       for stmt in block.body for n in ast.walk(stmt)}
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                for _, source, name, _ in _imports(module, module in packages, node):
                    target = f"{source}.{name}" if f"{source}.{name}" in sources else source
                    while target not in sources and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target in sources and target != module:
                        graph[module].add(target)
    rings = [ring for ring in _strongly_connected(graph) if len(ring) > 1]
    return [Violation(min(ring), 0, "cycle", " <-> ".join(sorted(ring))) for ring in rings]


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                                         or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _strongly_connected(graph: Mapping[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root] & graph.keys())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt] & graph.keys()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                ring = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    ring.add(member)
                    if member == node:
                        break
                found.append(ring)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def package_sources() -> tuple[dict[str, str], frozenset[str]]:
    sources, packages = {}, set()
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        sources[".".join(parts)] = path.read_text()
    return sources, frozenset(packages)


# ---------------------------------------------------------------- the house itself
def test_the_house_keeps_its_layer_rules():
    sources, packages = package_sources()
    assert len(sources) > 50  # the walk found the package
    violations = check(sources, packages)
    assert violations == [], "\n".join(f"{v.module}:{v.line} [{v.rule}] {v.detail}" for v in violations)


def test_the_layer_table_has_no_cycle_and_names_every_layer():
    assert set(MAY_IMPORT) == set(LAYER_OF.values())
    for layer, allowed in MAY_IMPORT.items():
        assert allowed <= set(MAY_IMPORT)
        seen, stack = set(), list(allowed)
        while stack:  # nothing a layer may import may import it back
            other = stack.pop()
            assert other != layer, f"{layer} reaches itself"
            if other not in seen:
                seen.add(other)
                stack.extend(MAY_IMPORT[other])
    assert not any(MAY_IMPORT[layer] - NO_TENSORS for layer in NO_TENSORS)  # and so, transitively


# ---------------------------------------------------------------- the checker fails when it should
CLEAN = {"textmill.engine.loop": "from textmill.messages import EngineRequest\n"}


def _rules(sources: dict[str, str], packages: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    return [(v.rule, v.detail) for v in check({**CLEAN, **sources}, packages)]


def test_a_clean_module_passes():
    assert check(CLEAN) == []


@pytest.mark.parametrize("source,library", [
    ("import torch\n", "torch"),
    ("import numpy as np\n", "numpy"),
    ("from torch.nn import functional\n", "torch.nn"),
    ("def f():\n    import torch\n", "torch"),  # inside a function too
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\n", "numpy"),
])
def test_api_and_engine_importing_tensor_libraries_fail(source, library):
    for module in ("textmill.api.fake", "textmill.engine.fake", "textmill.messages"):
        assert ("tensors", f"{layer_of(module)} imports {library}") in _rules({module: source})
    assert _rules({"textmill.runner.fake": source}) == []


@pytest.mark.parametrize("module,source,detail", [
    ("textmill.engine.fake", "from textmill.runner.model_runner import ModelRunner\n",
     "engine imports runner (textmill.runner.model_runner.ModelRunner)"),
    ("textmill.engine.fake", "from textmill.tokenizer import Tokenizer\n",
     "engine imports tokenizer (textmill.tokenizer.Tokenizer)"),
    ("textmill.runner.fake", "import textmill.engine.scheduler\n", "runner imports engine (textmill.engine.scheduler)"),
    ("textmill.models.fake", "from textmill.loader import load_model\n",
     "models imports loader (textmill.loader.load_model)"),
    ("textmill.config", "from textmill.api.errors import APIError\n", "types imports api (textmill.api.errors.APIError)"),
    ("textmill.api.fake", "from textmill.wiring import build_engine\n", "api imports wiring (textmill.wiring.build_engine)"),
    ("textmill.api.fake", "from textmill.scale import app\n", "api imports entry (textmill.scale.app)"),
    ("textmill.wiring", "from textmill.cli import build_parser\n", "wiring imports entry (textmill.cli.build_parser)"),
])
def test_a_lower_layer_importing_a_higher_one_fails(module, source, detail):
    assert _rules({module: source}) == [("layer", detail)]


def test_relative_imports_are_resolved_before_the_check():
    assert _rules({"textmill.engine.fake": "from ..runner import batch\n"}) == [
        ("layer", "engine imports runner (textmill.runner.batch)")]
    # In a package's __init__, "." is the package itself.
    assert _rules({"textmill.engine": "from .loop import x\n"}, frozenset({"textmill.engine"})) == []


def test_a_module_outside_the_layer_table_fails():
    assert _rules({"textmill.newthing": "from textmill.config import ServerConfig\n"}) == [
        ("layer", "textmill.newthing has no layer in LAYER_OF")]
    assert _rules({"textmill.api.fake": "from textmill.newthing import x\n"}) == [
        ("layer", "textmill.newthing has no layer in LAYER_OF")]


@pytest.mark.parametrize("source,detail", [
    ("from textmill.api.routes import _ERRORS\n", "takes textmill.api.routes._ERRORS"),
    ("from textmill.api import routes\nx = routes._serving\n", "uses textmill.api.routes._serving"),
    ("import textmill.api.routes as r\nr._serving()\n", "uses textmill.api.routes._serving"),
])
def test_taking_another_modules_private_names_fails(source, detail):
    assert _rules({"textmill.api.fake": source, "textmill.api.routes": ""}) == [("private", detail)]


def test_an_import_cycle_fails_even_through_a_lazy_import():
    """tokenizer.py <-> tokenizers_gguf.py was such a ring: one imported the other at the
    top, the other imported it back inside a function."""
    ring = {"textmill.tokenizer.core": "def load():\n    from textmill.tokenizer.gguf import read\n",
            "textmill.tokenizer.gguf": "from textmill.tokenizer.core import Tokenizer\n"}
    assert _rules(ring) == [("cycle", "textmill.tokenizer.core <-> textmill.tokenizer.gguf")]
    three = {"textmill.runner.a": "from textmill.runner import b\n", "textmill.runner.b": "import textmill.runner.c\n",
             "textmill.runner.c": "from .a import x\n"}
    assert _rules(three) == [("cycle", "textmill.runner.a <-> textmill.runner.b <-> textmill.runner.c")]


def test_type_checking_imports_make_no_cycle():
    typed = {"textmill.engine.request": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from textmill.engine.output import State\n",
             "textmill.engine.output": "from textmill.engine.request import Request\n"}
    assert _rules(typed) == []


def test_dunder_names_and_own_names_are_not_private():
    assert _rules({"textmill.api.fake": "from textmill import __version__\nx = ast.__name__\n"}) == []
