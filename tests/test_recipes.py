"""Every shipped recipe loads into the typed config; the default recipe equals the built-in defaults."""

from pathlib import Path

import pytest

from edgestill.config import ShrinkConfig, load_config

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "smollm2_135m_slice_kd_cpu.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ShrinkConfig)


def test_default_recipe_is_the_defaults():
    assert load_config(Path(__file__).parent.parent / "recipes" / "smollm2_135m_slice_kd_cpu.yaml") == ShrinkConfig()
