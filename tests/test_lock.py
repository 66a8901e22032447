"""requirements.lock is current: it pins what pyproject.toml asks for, and .venv holds exactly it.

`make setup` installs the lock with `--no-deps`, so a lock that misses a package, or pins one
pyproject.toml no longer allows, would otherwise show up as an ImportError somewhere in the suite.
These checks name the package and the fix (`make lock`) instead. The first runs in any environment;
the others read the installed distributions' metadata, so they run only in the environment `make
setup` builds from the lock (`.venv`).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
LOCKED_EXTRAS = ("dev",)  # what `make setup` installs: `pip install -e '.[dev]'`, from the lock
# Distributions a new virtual environment already has: not the lock's business.
VENV_SEED = {"pip"}

in_locked_venv = pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="not the environment `make setup` builds from requirements.lock")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: exact version} of every `name==version` pin in a pip requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line):
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def project_requirements(pyproject: dict, extras=LOCKED_EXTRAS) -> list[tuple[Requirement, str]]:
    """(requirement, where it is declared) for the project with `extras`, self-references expanded,
    plus the build backend (the project is installed without build isolation)."""
    project = pyproject["project"]
    own = canonicalize_name(project["name"])
    reqs = [(Requirement(r), "pyproject.toml [build-system]")
            for r in pyproject["build-system"]["requires"]]
    reqs += [(Requirement(r), "pyproject.toml [project]") for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["optional-dependencies"][extra]):
            if canonicalize_name(r.name) == own:
                todo += sorted(r.extras)
            else:
                reqs.append((r, f"pyproject.toml [{extra}]"))
    return [(r, where) for r, where in reqs if r.marker is None or r.marker.evaluate()]


def lock_problems(requirements: list[tuple[Requirement, str]], pins: dict[str, str],
                  installed: dict[str, metadata.Distribution] | None = None) -> list[str]:
    """What keeps `pins` from being the environment `requirements` resolve to, one line each.

    Without `installed`, only the project's own requirements are checked. With it ({canonical name:
    distribution}), the whole dependency tree is walked through the installed metadata: every
    package reached must be pinned and installed at its pin, and every pin must be reached.
    """
    problems = []
    todo = [(r, [where]) for r, where in requirements]
    extras_done: dict[str, set[str]] = {}
    while todo:
        req, chain = todo.pop(0)
        name = canonicalize_name(req.name)
        via = " <- ".join(chain)
        if name not in pins:
            problems.append(f"{name} ({req}, needed by {via}) is not in requirements.lock")
            continue
        if not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} in requirements.lock does not satisfy {req} "
                            f"(needed by {via})")
        if installed is None:
            continue
        old_extras = extras_done.get(name, set())
        new_extras = ({""} | set(req.extras)) - old_extras
        if not new_extras:
            continue
        first_visit = name not in extras_done
        extras_done[name] = old_extras | new_extras
        dist = installed.get(name)
        if dist is None:
            if first_visit:
                problems.append(f"{name}=={pins[name]} is in requirements.lock but not installed")
            continue
        if first_visit and dist.version != pins[name]:
            problems.append(f"{name} {dist.version} is installed, requirements.lock pins {pins[name]}")
        for sub in map(Requirement, dist.requires or []):
            if _applies(sub, new_extras) and not _applies(sub, old_extras):
                todo.append((sub, [f"{name}=={pins[name]}", *chain]))
    if installed is not None:
        problems += [f"{name}=={version} is pinned in requirements.lock but nothing requires it"
                     for name, version in sorted(pins.items()) if name not in extras_done]
    return problems


def _applies(req: Requirement, extras: set[str]) -> bool:
    """Whether a distribution's requirement holds here when the distribution is wanted with `extras`
    ("" standing for the distribution itself)."""
    if req.marker is None:
        return "" in extras
    return any(req.marker.evaluate({"extra": e}) for e in extras)


def installed_distributions() -> dict[str, metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}


def _fail(problems: list[str]) -> None:
    if problems:
        pytest.fail("requirements.lock and pyproject.toml disagree; run `make lock` (then `make "
                    "setup`), or fix pyproject.toml:\n  " + "\n  ".join(problems), pytrace=False)


def test_lock_pins_every_requirement_of_pyproject():
    pyproject = tomllib.loads(PYPROJECT.read_text())
    _fail(lock_problems(project_requirements(pyproject), read_lock()))


@in_locked_venv
def test_lock_is_the_whole_dependency_tree_and_is_installed():
    """Every package the requirements pull in is pinned and installed at its pin; no pin is left over."""
    pyproject = tomllib.loads(PYPROJECT.read_text())
    _fail(lock_problems(project_requirements(pyproject), read_lock(), installed_distributions()))


@in_locked_venv
def test_venv_holds_nothing_but_the_lock():
    pins = read_lock()
    own = canonicalize_name(tomllib.loads(PYPROJECT.read_text())["project"]["name"])
    extra = sorted(f"{name} {d.version}" for name, d in installed_distributions().items()
                   if name not in pins and name not in VENV_SEED | {own})
    assert not extra, (f".venv holds packages requirements.lock does not: {', '.join(extra)}. "
                       "`make clean setup` rebuilds it from the lock.")


# The checks themselves, on a made-up project: each kind of disagreement is found and named.
_PYPROJECT = {
    "build-system": {"requires": ["setuptools>=68"]},
    "project": {"name": "demo-pkg", "dependencies": ["numpy>=1.26"],
                "optional-dependencies": {"test": ["pytest>=8"], "dev": ["demo_pkg[test]", "rich"]}},
}
_PINS = {"setuptools": "80.0", "numpy": "2.0.0", "pytest": "8.1.0", "rich": "13.0.0"}


def test_project_requirements_expand_self_references():
    names = [r.name for r, _ in project_requirements(_PYPROJECT)]
    assert sorted(names) == ["numpy", "pytest", "rich", "setuptools"]


def test_a_requirement_missing_from_the_lock_is_named():
    pins = {k: v for k, v in _PINS.items() if k != "rich"}
    problems = lock_problems(project_requirements(_PYPROJECT), pins)
    assert problems == ["rich (rich, needed by pyproject.toml [dev]) is not in requirements.lock"]


def test_a_pin_outside_the_declared_range_is_named():
    problems = lock_problems(project_requirements(_PYPROJECT), {**_PINS, "numpy": "1.25.0"})
    assert problems == ["numpy==1.25.0 in requirements.lock does not satisfy numpy>=1.26 "
                        "(needed by pyproject.toml [project])"]


class _Dist:
    def __init__(self, version, requires=()):
        self.version, self.requires = version, list(requires)


def test_the_dependency_walk_finds_transitive_gaps_and_leftover_pins():
    installed = {"setuptools": _Dist("80.0"), "numpy": _Dist("2.0.0"), "rich": _Dist("13.0.0"),
                 "pytest": _Dist("8.1.0", ["pluggy>=1.5", 'colorama; sys_platform == "win32"',
                                           'hypothesis; extra == "dev"'])}
    problems = lock_problems(project_requirements(_PYPROJECT), {**_PINS, "six": "1.0"}, installed)
    assert problems == [
        "pluggy (pluggy>=1.5, needed by pytest==8.1.0 <- pyproject.toml [test]) is not in "
        "requirements.lock",
        "six==1.0 is pinned in requirements.lock but nothing requires it",
    ]


def test_the_dependency_walk_checks_installed_versions():
    installed = {"setuptools": _Dist("80.0"), "numpy": _Dist("2.1.0"), "pytest": _Dist("8.1.0"),
                 "rich": _Dist("13.0.0")}
    assert lock_problems(project_requirements(_PYPROJECT), _PINS, installed) == [
        "numpy 2.1.0 is installed, requirements.lock pins 2.0.0"]
