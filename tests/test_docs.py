"""The documentation's relative links lead somewhere, the README stays short, the tests' own
layout: no test file imports another (shared code is in tests/helpers.py and tests/conftest.py),
the package's: no import cycle among flash_jax's modules, and the config reaches no op; and the
code's: modules and the training loop's main function stay short."""

import ast
import glob
import os
import re
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
    [os.path.join(REPO, "README.md"), os.path.join(REPO, "DEVELOPERS.md")]
    + glob.glob(os.path.join(REPO, "docs", "*.md"))
)
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code (no links live there)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(path: str) -> set[str]:
    """The heading anchors GitHub gives a markdown page."""
    with open(path) as f:
        text = FENCE.sub("", f.read())
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: str) -> list[str]:
    with open(path) as f:
        targets = LINK.findall(prose(f.read()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_points_at_an_existing_file(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        resolved = (
            os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        )
        if not resolved.startswith(REPO + os.sep) and resolved != REPO:
            broken.append(f"{target} (outside the repository)")
        elif not os.path.exists(resolved):
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{os.path.relpath(page, REPO)}: {broken}"


def test_the_pages_are_found():
    assert len(PAGES) > 2 and all(os.path.exists(p) for p in PAGES)


def test_the_readme_is_at_most_300_lines():
    with open(os.path.join(REPO, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


CODE = [
    path
    for pattern in ("flash_jax/**/*.py", "scripts/**/*.py", "configs/*.py", "tests/*.py", "*.py")
    for path in glob.glob(os.path.join(REPO, pattern), recursive=True)
]
# Numbers of this project's issues ("issue", "#" and a number, or "(#" a number ")"): history
# belongs to git. This file, which holds examples of them, is not searched.
ISSUE_NUMBER = re.compile(r"\bissues? #\d+|\(#\d+\)", re.IGNORECASE)


def test_no_issue_numbers_in_the_code():
    assert ISSUE_NUMBER.search("a fix (GitHub issues #6, #12)")
    assert ISSUE_NUMBER.search("see (#25)") and not ISSUE_NUMBER.search("Stream #7(compute)")
    assert os.path.join(REPO, "train.py") in CODE
    found = {}
    for path in CODE:
        if os.path.samefile(path, __file__):
            continue
        with open(path) as f:
            if match := ISSUE_NUMBER.search(f.read()):
                found[os.path.relpath(path, REPO)] = match.group()
    assert not found, f"issue numbers in the code: {found}"


# ----------------------------------------------------------------------------- the tests' layout

TEST_SOURCES = sorted(glob.glob(os.path.join(REPO, "tests", "*.py")))


def imported_test_modules(source: str) -> list[str]:
    """The test files (`test_*`, `tests.test_*`) a Python source imports, anywhere in it."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # from . import x
            names += [alias.name for alias in node.names]
    parts = [name.split(".") for name in names]
    return sorted(
        {
            ".".join(p[:2] if p[0] == "tests" else p[:1])
            for p in parts
            if p[0].startswith("test_") or (p[0] == "tests" and p[1:2] and p[1].startswith("test_"))
        }
    )


def test_the_test_import_check_finds_imports_of_test_files():
    source = textwrap.dedent(
        """
        import json
        import test_a
        from test_b import x
        from tests.test_c import (y, z)
        from tests import helpers, test_d
        from tests.helpers import test_e_like_name
        from . import test_f


        def f():
            import tests.test_g.sub
        """
    )
    assert imported_test_modules(source) == [
        "test_a",
        "test_b",
        "test_f",
        "tests.test_c",
        "tests.test_d",
        "tests.test_g",
    ]


def test_no_test_file_imports_another():
    """Helpers shared by several test files live in tests/helpers.py, fixtures in conftest.py."""
    assert os.path.join(REPO, "tests", "helpers.py") in TEST_SOURCES
    found = {}
    for path in TEST_SOURCES:
        with open(path) as f:
            if modules := imported_test_modules(f.read()):
                found[os.path.relpath(path, REPO)] = modules
    assert not found, f"test files that import test files: {found}"


PACKAGE_SOURCES = sorted(glob.glob(os.path.join(REPO, "flash_jax", "**", "*.py"), recursive=True))


def module_name(path: str) -> str:
    """flash_jax/ops/attention.py -> flash_jax.ops.attention; a package's __init__.py: its name."""
    parts = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, modules: set[str]) -> set[str]:
    """The modules of `modules` that the source of module `name` imports, at module level and
    inside functions alike: `from a import b` imports module a.b where there is one, else a.
    The package writes absolute imports only; a relative one fails here (it would go unseen)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: a relative import (line {node.lineno})"
            base = node.module
            found |= {
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            }
    return (found & modules) - {name}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path) for path in PACKAGE_SOURCES}
    graph = {}
    for path in PACKAGE_SOURCES:
        with open(path) as f:
            graph[module_name(path)] = imported_modules(f.read(), module_name(path), modules)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph is acyclic (depth-first)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_check_finds_function_level_imports_and_cycles():
    source = textwrap.dedent(
        """
        import json
        import flash_jax.b
        from flash_jax import c, missing
        from flash_jax.pkg import d


        def f():
            from flash_jax.pkg import e
        """
    )
    modules = {"flash_jax", "flash_jax.a", "flash_jax.b", "flash_jax.c"}
    modules |= {"flash_jax.pkg", "flash_jax.pkg.e"}
    assert imported_modules(source, "flash_jax.a", modules) == {
        "flash_jax",  # from flash_jax import missing: the package itself
        "flash_jax.b",
        "flash_jax.c",
        "flash_jax.pkg",  # d is no module: a name of the package
        "flash_jax.pkg.e",
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    with pytest.raises(AssertionError, match="flash_jax.a: a relative import"):
        imported_modules("from . import b", "flash_jax.a", modules)
    assert reachable({"a": {"b"}, "b": {"c"}, "d": {"a"}}, "a") == {"b", "c"}


def test_no_import_cycle_among_the_package_modules():
    """Function-level imports count: an import deferred into a function hides a cycle, it does
    not end it."""
    graph = import_graph()
    assert {"flash_jax.config", "flash_jax.ops.attention", "flash_jax.ops.pallas_tpu"} <= set(graph)
    assert not (cycle := find_cycle(graph)), f"import cycle: {' -> '.join(cycle)}"


def test_the_config_imports_no_op_kernel_or_layer():
    """Config values are checked against names in flash_jax.dispatch; the config module does not
    reach the ops (nor anything that imports them), even through a function-level import."""
    reached = reachable(import_graph(), "flash_jax.config")
    assert "flash_jax.dispatch" in reached
    assert not {m for m in reached if m.startswith(("flash_jax.ops", "flash_jax.layers"))}


def test_no_library_module_imports_the_command_line_helpers():
    """flash_jax.cli (flags, one-line errors, the quiet console) serves the entry points alone."""
    graph = import_graph()
    assert "flash_jax.cli.console" in graph
    importers = {
        module
        for module, imported in graph.items()
        if not module.startswith("flash_jax.cli")
        and any(name.startswith("flash_jax.cli") for name in imported)
    }
    assert not importers, f"library modules that import flash_jax.cli: {sorted(importers)}"


# ----------------------------------------------------------------------------- the code's layout

MODULE_MAX_LINES = 500
TRAIN_AND_EVALUATE_MAX_LINES = 150
TOP_LEVEL_MAX_MODULES = 10


def test_the_top_of_the_package_holds_at_most_10_modules():
    """Subpackages group the rest by job (DEVELOPERS.md's layout)."""
    paths = glob.glob(os.path.join(REPO, "flash_jax", "*.py"))
    names = sorted(os.path.basename(p) for p in paths if not p.endswith("__init__.py"))
    assert "config.py" in names  # the package is found
    assert len(names) <= TOP_LEVEL_MAX_MODULES, f"{len(names)} top-level modules: {names}"


def line_count(path: str) -> int:
    with open(path) as f:
        return len(f.read().splitlines())


def test_no_library_module_exceeds_500_lines_but_the_pallas_kernels():
    paths = glob.glob(os.path.join(REPO, "flash_jax", "**", "*.py"), recursive=True)
    assert len(paths) > 40  # the package is found
    long = {}
    for path in paths:
        name = os.path.relpath(path, REPO).replace(os.sep, "/")
        kernel = re.fullmatch(r"flash_jax/ops/pallas_\w+\.py", name)
        if not kernel and line_count(path) > MODULE_MAX_LINES:
            long[name] = line_count(path)
    assert not long, f"modules over {MODULE_MAX_LINES} lines: {long}"


def function_lines(source: str, name: str) -> int:
    """Lines of the top-level function `name` in `source`, from its `def` to its last line."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node.end_lineno - node.lineno + 1
    raise AssertionError(f"no top-level function {name}")


def test_function_lines_counts_from_def_to_the_last_line():
    assert function_lines("x = 1\n\n\ndef f(a):\n    '''Doc.'''\n\n    return a\n", "f") == 4


def test_train_and_evaluate_is_at_most_150_lines():
    with open(os.path.join(REPO, "flash_jax", "train", "loop.py")) as f:
        lines = function_lines(f.read(), "train_and_evaluate")
    assert lines <= TRAIN_AND_EVALUATE_MAX_LINES, f"train_and_evaluate has {lines} lines"
