"""pyproject.toml and environment.yml must pin the same versions (DESIGN.md §5)."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s;]+)\s*", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def pyproject_pins():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        deps += extra
    pins = _pins(deps)
    assert len(pins) == len(deps), f"every dependency in pyproject.toml must be pinned with ==: {deps}"
    return pins


def environment_pins():
    text = (ROOT / "environment.yml").read_text()
    items = [m.group(1) for m in re.finditer(r"^\s*-\s+(\S.*?)\s*$", text, flags=re.M)]
    return _pins(items), items


def test_every_pyproject_dependency_is_pinned_and_in_environment_yml():
    py = pyproject_pins()
    env, _ = environment_pins()
    assert py == env, (
        "pyproject.toml and environment.yml disagree: "
        f"only in pyproject {sorted(set(py.items()) - set(env.items()))}, "
        f"only in environment.yml {sorted(set(env.items()) - set(py.items()))}"
    )


def test_environment_yml_python_matches_requires_python():
    _, items = environment_pins()
    assert "python=3.11" in items
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "3.11" in data["project"]["requires-python"]


def test_torch_and_torchvision_stay_paired():
    py = pyproject_pins()
    assert (py["torch"], py["torchvision"]) == ("2.14.1", "0.29.1"), "torch and torchvision must move together"
