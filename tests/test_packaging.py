"""The package declares what it uses, and uses what it declares."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
# Distribution name -> the module it provides, where they differ.
MODULES = {"hydra-core": "hydra"}
# Declared for a library that imports it itself: LLaMA-family slow tokenizers need it.
INDIRECT = {"sentencepiece"}


def test_every_declared_dependency_is_imported_by_hift():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    source = "\n".join(p.read_text() for p in (ROOT / "hift_cli").rglob("*.py"))
    unused = []
    for dep in deps:
        name = re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0]
        if name in INDIRECT:
            continue
        module = MODULES.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from) {module}\b", source, re.M):
            unused.append(name)
    assert not unused, f"declared but never imported: {unused}"


def test_every_python_package_is_installed():
    """pyproject.toml lists the packages by name: a new sub-package left out would be
    missing from a wheel (an editable install hides it)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "hift_cli").rglob("__init__.py")}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
