"""Every shipped recipe loads into the typed config; the default recipe equals the built-in defaults."""

from pathlib import Path

import pytest
import yaml

from edgestill.config import ShrinkConfig, TimeseriesConfig, load_config, load_timeseries_config

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "smollm2_135m_slice_kd_cpu.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    if yaml.safe_load(path.read_text()).get("task") == "timeseries":
        assert isinstance(load_timeseries_config(path), TimeseriesConfig)
    else:
        assert isinstance(load_config(path), ShrinkConfig)


def test_timeseries_recipe_is_the_defaults_with_its_own_folder():
    cfg = load_timeseries_config(Path(__file__).parent.parent / "recipes" / "cmapss_fd001_rul_online_kd.yaml")
    assert cfg == TimeseriesConfig(output_dir="runs/rul-cmapss-fd001")


def test_default_recipe_is_the_defaults():
    assert load_config(Path(__file__).parent.parent / "recipes" / "smollm2_135m_slice_kd_cpu.yaml") == ShrinkConfig()
