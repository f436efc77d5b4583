"""pyproject.toml holds compatible ranges; constraints.txt the exact tested pins; environment.yml the same
pins (DESIGN.md §5). These tests keep the three in step."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _pins(lines):
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s;]+)\s*", line)
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        deps += extra
    return {_norm(r.name): r for r in map(Requirement, deps)}


def constraint_pins():
    lines = [l for l in (ROOT / "constraints.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    pins = _pins(lines)
    assert len(pins) == len(lines), f"every line of constraints.txt must be an exact pin (name==version): {lines}"
    return pins


def environment_pins():
    text = (ROOT / "environment.yml").read_text()
    items = [m.group(1) for m in re.finditer(r"^\s*-\s+(\S.*?)\s*$", text, flags=re.M)]
    return _pins(items), items


def test_pyproject_uses_ranges_not_exact_pins():
    for req in pyproject_requirements().values():
        assert not any(s.operator == "==" for s in req.specifier), (
            f"pyproject.toml pins {req}: use a compatible range there and the exact version in constraints.txt")


def test_every_dependency_has_a_tested_pin_inside_its_range():
    reqs, pins = pyproject_requirements(), constraint_pins()
    assert set(reqs) == set(pins), (f"only in pyproject.toml: {sorted(set(reqs) - set(pins))}; "
                                    f"only in constraints.txt: {sorted(set(pins) - set(reqs))}")
    for name, req in reqs.items():
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


def test_environment_yml_lists_the_constraint_pins():
    env, _ = environment_pins()
    pins = constraint_pins()
    assert env == pins, (f"constraints.txt and environment.yml disagree: only in constraints "
                         f"{sorted(set(pins.items()) - set(env.items()))}, only in environment.yml "
                         f"{sorted(set(env.items()) - set(pins.items()))}")


def test_environment_yml_python_matches_requires_python():
    _, items = environment_pins()
    assert "python=3.11" in items
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "3.11" in data["project"]["requires-python"]


def test_torch_and_torchvision_stay_paired():
    pins = constraint_pins()
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1"), "torch and torchvision must move together"


def test_make_installs_with_the_constraints():
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
