"""Names have one source of truth: every list of valid choices (methods, models, attacks, normalisations,
backends, datasets, profiles) comes from its registry, and no other list of those names exists in the code.

The check reads every module of the four packages and flags any literal tuple, list, set or dict keys of
two or more strings of one registry, unless it is that registry's own definition. The recipes' protocol
tables (recipes/protocols.py, recipes/published.py) are exempt: they name the cells a profile trains and
the seed's numbers, which is data about the paper, not a list of valid choices. A method's name, and an
option only one method has, are spelt nowhere but in its class and in the protocol rows (recipes/protocols.py).
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import kernels
import loaders
import recipes
from fastrobust.attacks import AA_VERSIONS, ATTACKS, RANDOM_STARTS
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.methods import METHODS
from fastrobust.models import list_models

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fastrobust", "kernels", "loaders", "recipes")
EXEMPT = {"recipes/protocols.py", "recipes/published.py"}

REGISTRIES = {
    "methods": (set(METHODS), {("fastrobust/methods.py", "METHODS")}),
    "models": (set(list_models()), set()),
    "attacks": (set(ATTACKS), {("fastrobust/attacks.py", "ATTACKS")}),
    "normalisations": (set(kernels.NORMALIZE_MODES), {("kernels/reference.py", "NORMALIZE_MODES")}),
    "kernel backends": (set(kernels.BACKENDS), {("kernels/dispatch.py", "BACKENDS")}),
    "loader backends": (set(loaders.BACKENDS), {("loaders/__init__.py", "BACKENDS")}),
    "datasets": (set(loaders.DATASETS), {("loaders/datasets.py", "DATASETS")}),
    "profiles": (set(recipes.PROFILES), set()),
}


def _string_literals(tree: ast.AST):
    """(line, names, assigned-to) of every literal collection of two or more strings."""
    assigned = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and node.value is not None:
                    assigned[id(node.value)] = t.id
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        names = [e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if len(names) >= 2:
            yield node.lineno, names, assigned.get(id(node))


def test_no_list_of_registry_names_outside_its_registry():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in EXEMPT:
                continue
            for line, names, target in _string_literals(ast.parse(path.read_text())):
                for kind, (valid, homes) in REGISTRIES.items():
                    hits = sorted(set(names) & valid)
                    if len(hits) >= 2 and (rel, target) not in homes:
                        found.append(f"{rel}:{line}: {kind} {hits} (use the registry)")
    assert not found, "lists of registry names outside their registries:\n" + "\n".join(found)


def test_the_check_catches_a_copied_list(tmp_path):
    """The check itself can fail: a module with a hand-written method list is flagged."""
    tree = ast.parse("VALID = ('trades', 'dtrades', 'mart')\n")
    (line, names, target), = list(_string_literals(tree))
    assert target == "VALID" and len(set(names) & REGISTRIES["methods"][0]) == 3


# -- a method declares what it needs: nothing outside its class reads its name or its options ---------------

import inspect  # noqa: E402

# each method's module (methods.py; awp.py for AWP): there, and only there, its own name and options are spelt
METHOD_HOMES = {Path(inspect.getsourcefile(cls)).relative_to(REPO).as_posix() for cls in METHODS.values()}
OWN_NAMES = {home: {n for n, cls in METHODS.items() if Path(inspect.getsourcefile(cls)).relative_to(REPO).as_posix()
                    == home} for home in METHOD_HOMES}
OPTIONS = {f.name for cls in METHODS.values() for f in __import__("dataclasses").fields(cls)}


def _reads_a_method_by_name(tree: ast.AST):
    """(line, what) of every comparison with a method's name and every getattr of a method's option."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [s.value for s in sides if isinstance(s, ast.Constant) and s.value in METHODS]
            # against a method or its name (not an attack's random-start kind "trades", which shares it)
            others = [ast.unparse(s) for s in sides if isinstance(s, (ast.Name, ast.Attribute))]
            if names and any("method" in o or o.endswith("name") for o in others):
                yield node.lineno, f"compares with the method name {names[0]!r}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in OPTIONS:
                target = ast.unparse(node.args[0])
                if "method" in target:
                    yield node.lineno, f"{node.func.id}({target}, {node.args[1].value!r})"


def test_no_method_is_read_by_name_outside_its_class():
    """Compile's double backward, the bench's variants and the step a method extends are the method's
    declarations (Method.double_backward, bench_variants, extends): no other module asks which method it
    is or reads its options by name. Recipes' protocol tables are exempt (they are the paper's cells)."""
    found = [f"{rel}:{line}: {what}" for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             if (rel := path.relative_to(REPO).as_posix()) not in EXEMPT | METHOD_HOMES
             for line, what in _reads_a_method_by_name(ast.parse(path.read_text()))]
    assert not found, "a method read by name outside its class (declare it on the method):\n" + "\n".join(found)


def test_the_method_check_catches_a_name_test():
    leaks = ['if getattr(cfg.method, "sensitivity", None) == "exact": pass', 'ok = method == "dtrades"',
             'ok = "trades" in cfg.method.name']
    for code in leaks:
        assert list(_reads_a_method_by_name(ast.parse(code))), code
    assert not list(_reads_a_method_by_name(ast.parse('ok = cfg.method.double_backward')))


# -- a method's name and its own options are spelt in its class and the protocol rows only ---------------------

SPELLING_HOMES = {"fastrobust/methods.py", "recipes/protocols.py"}   # every method's name may be spelt there
OTHER_MEANINGS = set(RANDOM_STARTS) | set(AA_VERSIONS)   # "trades" is also a random start, "standard" an AA version
CONFIG_FIELDS = {f.name for cls in (TrainConfig, EvalConfig) for f in dataclasses.fields(cls)}
# an option of one method only, and no config field's name; longer than a letter (FAAL's r is also open()'s mode)
OWN_OPTIONS = {name for name in OPTIONS if len(name) > 1 and name not in CONFIG_FIELDS
               and sum(name in {f.name for f in dataclasses.fields(cls)} for cls in METHODS.values()) == 1}
READ_CONFIGS = ("fastrobust", "recipes")   # the packages that hold methods and read their records


def _spells_a_method(tree: ast.AST, options: bool = True, own: set[str] = frozenset()):
    """(line, what) of every string that is a method's name (but ``own``, the module's own methods) or,
    with ``options``, an option of one method."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in METHODS and node.value not in OTHER_MEANINGS | own:
                yield node.lineno, f"the method name {node.value!r}"
            elif options and node.value in OWN_OPTIONS:
                yield node.lineno, f"the method option {node.value!r}"


def test_no_method_name_or_own_option_is_spelt_outside_its_class():
    """What a module needs of a method comes from the method (a declaration, a registry entry) or from the
    protocol rows' own data, never from its name or its option written out again. The kernels and loaders
    know no method, and there an option's name is their own (the kernels' parameters are named as the options
    they take, D-TRADES' normalize and lambda_scale; a loader's "base" backend): only method names are looked for."""
    found = [f"{rel}:{line}: {what}" for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             if (rel := path.relative_to(REPO).as_posix()) not in SPELLING_HOMES
             for line, what in _spells_a_method(ast.parse(path.read_text()), options=package in READ_CONFIGS
                                                and rel not in METHOD_HOMES, own=OWN_NAMES.get(rel, set()))]
    assert not found, ("a method's name or option spelt outside its class and the protocol rows (declare it on "
                       "the method, or read the row's data):\n" + "\n".join(found))


def test_the_spelling_check_catches_a_name_and_an_option():
    assert {"dtrades", "sensitivity"} <= set(METHODS) | OWN_OPTIONS
    for code in ('ABLATION = ("dtrades_half", "dtrades")', 'mode = cfg["method"]["sensitivity"]',
                 '_check("sensitivity", s, B)'):
        assert list(_spells_a_method(ast.parse(code))), code
    assert not list(_spells_a_method(ast.parse('start = random_start(x, eps, "linf", "trades")')))
    assert not list(_spells_a_method(ast.parse('x = cfg["norm"]')))   # the threat model, no method's option
