"""Every shipped recipe loads into the typed config; the default recipe equals the built-in defaults."""

from pathlib import Path

import pytest
import yaml

from edgestill.config import (
    FederatedConfig,
    ShrinkConfig,
    TimeseriesConfig,
    VisionConfig,
    load_config,
    load_federated_config,
    load_timeseries_config,
    load_vision_config,
)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "smollm2_135m_slice_kd_cpu.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    recipe = yaml.safe_load(path.read_text())
    if recipe.get("task") == "timeseries":
        assert isinstance(load_timeseries_config(path), TimeseriesConfig)
    elif recipe.get("task") == "vision":
        assert isinstance(load_vision_config(path), VisionConfig)
    elif recipe.get("stage") == "federated":
        assert isinstance(load_federated_config(path), FederatedConfig)
    else:
        assert isinstance(load_config(path), ShrinkConfig)


def test_timeseries_recipe_is_the_defaults_with_its_own_folder():
    cfg = load_timeseries_config(Path(__file__).parent.parent / "recipes" / "cmapss_fd001_rul_online_kd.yaml")
    assert cfg == TimeseriesConfig(output_dir="runs/rul-cmapss-fd001")


def test_vision_recipe_is_the_defaults_with_its_own_folder():
    cfg = load_vision_config(Path(__file__).parent.parent / "recipes" / "mnist_lowlight_edgevl.yaml")
    assert cfg == VisionConfig(output_dir="runs/vision-mnist-lowlight")


def test_default_recipe_is_the_defaults():
    assert load_config(Path(__file__).parent.parent / "recipes" / "smollm2_135m_slice_kd_cpu.yaml") == ShrinkConfig()


def test_federated_recipe_is_the_audit_benchmarks_setting():
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import audit

    cfg = load_federated_config(Path(__file__).parent.parent / "recipes" / "spamassassin_federated_audit.yaml")
    f, s = cfg.federated, audit.FULL
    assert (f.clients, f.malicious, f.rounds, f.public_poison, f.client_layers) == (
        s["clients"], 1, s["rounds"], s["public_poison"], s["client_layers"])
    assert (cfg.client.steps, cfg.server.steps, cfg.student.compression_x) == (s["client_steps"], s["server_steps"], 25)
