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
    elif recipe.get("task") == "classification":
        from edgestill.config import ClassifierShrinkConfig, load_classifier_config

        assert isinstance(load_classifier_config(recipe.get("stage"), path), ClassifierShrinkConfig)
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


def test_classifier_soup_recipe_is_the_benchmarks_row_that_met_the_target(monkeypatch):
    """recipes/moviereviews_minilm_soup_classifier.yaml trains what benchmarks/classifier.py trained for the soup of
    seeds 0+1 in classifier_soup.json (its settings; not the benchmark's evaluation shortcuts or folders)."""
    import argparse
    import json
    import sys

    from edgestill.config import load_classifier_config
    from edgestill.jobs.classify import plain

    root = Path(__file__).parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    import classifier

    result = json.loads((root / "benchmarks" / "results" / "classifier_soup.json").read_text())
    bench = classifier.Bench(argparse.Namespace(**result["args"]))
    monkeypatch.setattr(bench, "student_params", lambda data, x: 824934)  # its teacher's, recorded in the JSON rows
    row = next(r for r in result["datasets"]["moviereviews"]["rows"] if r["name"] == "kd-25x")
    assert row["student_target_params"] == 824934 and row["soup_seeds"] == [0, 1]
    want = plain(bench.student_cfg("moviereviews", "kd-25x", 25.0, "kd"))
    got = plain(load_classifier_config("shrink", root / "recipes" / "moviereviews_minilm_soup_classifier.yaml"))
    for section in ("student", "train", "kd", "soup", "data"):
        assert got[section] == want[section], section
    # the teacher command in the recipe's comment fine-tunes the benchmark's teacher
    assert "edgestill finetune --task classification --data moviereviews --out runs/finetune-moviereviews " \
           "train.patience=4" in (root / "recipes" / "moviereviews_minilm_soup_classifier.yaml").read_text()
    teacher = plain(load_classifier_config("finetune", overrides=["train.patience=4"], values={"data.path": "moviereviews"}))
    for section, value in plain(bench.teacher_cfg("moviereviews")).items():
        if section != "output_dir":
            assert teacher[section] == value, section
