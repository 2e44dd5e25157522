"""The package's shape: no module of srd_ext imports in a circle, every registered rule has its
literal reference case, the README's list of supported ops is the registry's, and the README's
coverage table is the zoo's, as benchmarks/coverage.py renders it."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from typing import Dict, List, Set

import pytest

import srd_ext
from srd_ext import rules
from srd_ext.rules.activations import Activation
from srd_ext.rules.base import REGISTRY, Rule

import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(srd_ext.__file__)


def _modules() -> Dict[str, str]:
    """Every module of srd_ext by dotted name -> its file (the compiled extension too)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith((".so", ".pyd")):
                rel = os.path.relpath(os.path.join(folder, f.split(".")[0]), os.path.dirname(PACKAGE))
                out[rel.replace(os.sep, ".")] = os.path.join(folder, f)
            elif f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(PACKAGE))[:-3]
                name = rel.replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(folder, f)
    return out


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the srd_ext modules it imports anywhere in its body (inside functions too: an
    import deferred to call time is still a dependency). ``from . import x`` counts as importing
    the submodule ``x`` where one exists, else the package; a package's own ``__init__`` being run
    by Python on the way to a submodule is not counted."""
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        if not path.endswith(".py"):
            continue
        is_pkg = path.endswith("__init__.py")
        package = name if is_pkg else name.rsplit(".", 1)[0]
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in mods else stem for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m) -> List[str]:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_no_import_circle():
    graph = import_graph()
    assert "srd_ext.capture" in graph and "srd_ext.rules.base" in graph["srd_ext.rules.affine"]
    cycle = find_cycle(graph)
    assert not cycle, "srd_ext imports in a circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    # the check above can fail: a planted circle is found
    graph = import_graph()
    graph["srd_ext.nodes"].add("srd_ext.capture")
    assert find_cycle(graph)


def test_nodes_is_a_leaf():
    assert import_graph()["srd_ext.nodes"] == set()


def _rule_classes() -> List[type]:
    return sorted({type(r) for r in REGISTRY.values() if r.decomposable}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _rule_classes(), ids=lambda c: c.__name__)
def test_every_rule_has_a_reference_case(cls):
    if issubclass(cls, Activation):
        # an activation is a decomposition site: the reference decomposes its pre-activation and
        # hands the site's relevance through unchanged, for every activation alike
        return
    assert cls in reference.LINEAR, f"rule {cls.__name__} has no linear case in tests/reference.py"
    if cls.bias is not Rule.bias:
        assert cls in reference.BIASES, f"rule {cls.__name__} shares a bias but has no case in tests/reference.py"


def test_reference_keys_are_registered_rules():
    registered = {type(r) for r in REGISTRY.values()}
    stale = [c.__name__ for c in list(reference.LINEAR) + list(reference.BIASES) if c not in registered]
    assert not stale, f"reference cases for rules no longer registered: {stale}"


def test_readme_op_list_is_the_registry():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"<!-- ops:start -->\n(.*?)\n<!-- ops:end -->", text, re.S)
    assert m, "README.md has no <!-- ops:start --> ... <!-- ops:end --> block"
    assert m.group(1).strip() == rules.supported_table().strip(), (
        "README's list of supported ops differs from the registry: run "
        "`python benchmarks/coverage.py --update-readme --ops-only`"
    )


# --------------------------------------------------------------------------------------------
# The README's coverage table is what benchmarks/coverage.py renders for the zoo
# --------------------------------------------------------------------------------------------
def _coverage_script():
    """benchmarks/coverage.py as a module (loaded by path: the name ``coverage`` is also that of
    the coverage.py package)."""
    spec = importlib.util.spec_from_file_location(
        "srd_coverage_script", os.path.join(ROOT, "benchmarks", "coverage.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _readme_coverage():
    """(the paragraph before the table, the table's header lines, {(model, library): cells})."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"<!-- coverage:start -->\n(.*?)\n<!-- coverage:end -->", text, re.S)
    assert m, "README.md has no <!-- coverage:start --> ... <!-- coverage:end --> block"
    intro, _, tab = m.group(1).partition("\n\n")
    lines = tab.strip().splitlines()
    rows: Dict[tuple, List[str]] = {}
    for line in lines[2:]:
        cells = _cells(line)
        assert (cells[0], cells[1]) not in rows, f"{cells[0]} ({cells[1]}) twice in the README's coverage table"
        rows[(cells[0], cells[1])] = cells
    return intro, "\n".join(lines[:2]), rows


def test_readme_coverage_table_lists_the_zoo():
    """Every model of the zoo (torchvision's CNNs, the timm sample) has its row and no other
    model does; the excluded families, the refused models and the summary are the zoo's."""
    from srd_ext import zoo

    cov = _coverage_script()
    intro, header, rows = _readme_coverage()
    assert header == cov.HEADER
    tv, tv_excluded = zoo.torchvision_cnns()
    expected = {(n, "torchvision") for n in tv} | {(n, "timm") for n in zoo.TIMM_SAMPLE}
    missing, extra = sorted(expected - set(rows)), sorted(set(rows) - expected)
    assert not missing and not extra, (
        f"README's coverage table differs from srd_ext.zoo: missing {missing}, not in the zoo {extra}; "
        "run `python benchmarks/coverage.py --update-readme`"
    )
    assert not {n for n, _ in rows} & set(tv_excluded)
    refused = {n for (n, lib), cells in rows.items() if cells[2] != "yes"}
    assert refused == set(zoo.TIMM_REFUSED), "README's refused models are not srd_ext.zoo.TIMM_REFUSED"
    results = [zoo.ZooResult(n, lib, cells[2] == "yes") for (n, lib), cells in rows.items()]
    assert intro == cov.render(results).split("\n\n")[0]  # the summary and the excluded families


COVERAGE_SAMPLE = [("torchvision", "resnet18"), ("torchvision", "squeezenet1_1"), ("timm", "starnet_s050")]


@pytest.mark.parametrize("library, name", COVERAGE_SAMPLE)
def test_readme_coverage_rows_are_reproduced(library, name):
    """coverage.py's own row for a few small models has the README's outcome: explained or
    refused (with the reason), the encoder output, the unassigned share and the forward error to
    the printed precision. The conservation error's last digit depends on the machine (only its
    bound is checked), the timings are not compared."""
    if library == "timm":
        pytest.importorskip("timm")
    cov = _coverage_script()
    _, _, rows = _readme_coverage()
    (res,) = cov.rows_for(library, [name], False)
    got, want = _cells(cov.row(res)), rows[(name, library)]
    assert len(got) == len(want) == 9
    # model, library, explained (or the reason refused), encoder output
    assert got[:4] == want[:4]
    if res.explained:
        assert got[5:7] == want[5:7]  # unassigned, forward error
        assert res.budget_error < 1e-4 and float(want[4]) < 1e-4  # conservation error
