"""Docs that cannot drift: the config reference is generated from the schema."""

import re
from pathlib import Path

from hift_cli.reference import markdown

ROOT = Path(__file__).parents[1]


def test_config_reference_is_up_to_date():
    assert (ROOT / "docs" / "config.md").read_text() == markdown(), \
        "regenerate: python -m hift_cli.reference > docs/config.md"


def test_readme_links_and_recipes_exist():
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs|bench)/[^)#]+)\)", readme):
        assert (ROOT / link).exists(), link
    for recipe in (ROOT / "recipes" / "recipe").glob("*.yaml"):
        assert f"`{recipe.stem}`" in readme, recipe.stem
