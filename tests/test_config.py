"""Config loading: defaults, recipe YAML, typed `key=value` overrides, clear errors, round trip."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from edgestill.config import (
    DistillConfig,
    ShrinkConfig,
    apply_override,
    config_from_dict,
    load_config,
    validate,
)
from edgestill.errors import EdgestillError


def test_defaults_load_and_validate():
    cfg = load_config()
    assert isinstance(cfg, ShrinkConfig)
    assert cfg == ShrinkConfig()
    assert cfg.distill.steps == DistillConfig().steps
    assert cfg.teacher.model == "smollm2-135m"
    assert cfg.data.path == "shakespeare"
    assert cfg.student.layers is None
    validate(cfg)  # the defaults themselves are valid


def test_recipe_then_overrides_apply_with_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "distill": {"steps": 50, "lr": 0.01, "alpha": 0.5},
        "student": {"num_layers": 3, "layers": [0, 2, 3]},
        "data": {"seq_len": 64},
    }))
    cfg = load_config(recipe, overrides=[
        "distill.steps=7",          # int, overrides the recipe
        "distill.lr=1e-3",          # YAML 1.1 reads this as a string; must become a float
        "distill.temperature=2",    # int given to a float field
        "student.layers=[0, 3]",    # list
        "student.intermediate_size=null",
        "eval.prompts=[\"a b\", c]",
        "distill.cache_teacher=false",
    ])
    assert cfg.distill.steps == 7 and type(cfg.distill.steps) is int
    assert cfg.distill.lr == pytest.approx(1e-3) and type(cfg.distill.lr) is float
    assert cfg.distill.temperature == 2.0 and type(cfg.distill.temperature) is float
    assert cfg.distill.alpha == 0.5  # from the recipe, not overridden
    assert cfg.data.seq_len == 64
    assert cfg.student.num_layers == 3
    assert cfg.student.layers == [0, 3]
    assert cfg.student.intermediate_size is None
    assert cfg.eval.prompts == ["a b", "c"]
    assert cfg.distill.cache_teacher is False


def test_override_null_resets_optional_list():
    cfg = load_config(overrides=["student.layers=[1, 2]"])
    assert cfg.student.layers == [1, 2]
    apply_override(cfg, "student.layers=null")
    assert cfg.student.layers is None


def test_quick_profile_then_overrides_win():
    cfg = load_config(quick=True, overrides=["distill.steps=3"])
    assert cfg.data.seq_len == 128  # from the quick profile
    assert cfg.distill.steps == 3


@pytest.mark.parametrize("override, suggestion", [
    ("distill.stepz=3", "steps"),
    ("distil.steps=3", "distill"),
    ("student.num_layer=2", "num_layers"),
])
def test_unknown_key_raises_with_suggestion(override, suggestion):
    with pytest.raises(EdgestillError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert "unknown config key" in msg
    assert override.split("=")[0].split(".")[0] in msg
    assert "did you mean" in msg and suggestion in msg


def test_unknown_key_in_recipe_file_raises(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("distill:\n  lr_schedule: cosine\n")
    with pytest.raises(EdgestillError, match="unknown config key 'distill.lr_schedule'"):
        load_config(recipe)


@pytest.mark.parametrize("override, needle", [
    ("distill.steps=abc", "integer"),
    ("distill.steps=2.5", "integer"),
    ("distill.steps=true", "integer"),
    ("distill.lr=fast", "number"),
    ("distill.cache_teacher=1", "true or false"),
    ("student.layers=3", "list"),
    ("student.layers=[a, b]", "integer"),
    ("teacher.model=[x]", "string"),
])
def test_wrong_type_raises(override, needle):
    with pytest.raises(EdgestillError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value)
    assert override.split("=")[0] in str(e.value)


def test_malformed_override_and_section_value():
    with pytest.raises(EdgestillError, match="section.key=value"):
        load_config(overrides=["distill.steps"])
    with pytest.raises(EdgestillError, match="must be a mapping"):
        load_config(overrides=["distill=3"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(EdgestillError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_to_yaml_config_from_dict():
    cfg = load_config(overrides=["distill.lr=1e-3", "student.layers=[0, 5, 9]", "student.intermediate_size=256",
                                 "student.hidden_size=384", "student.num_attention_heads=6",
                                 "student.num_key_value_heads=2", "student.width_importance=activation",
                                 "eval.prompts=[\"x\"]", "output.dtype=float32"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert dataclasses.asdict(again)["student"]["layers"] == [0, 5, 9]
    s = again.student
    assert (s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.width_importance) == (384, 6, 2, "activation")


def test_width_keys_default_to_the_teacher_and_auto_ranking(tmp_path):
    s = load_config().student
    assert s.hidden_size is s.num_attention_heads is s.num_key_value_heads is None
    assert s.width_importance == "auto"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student:\n  hidden_size: 448\n  num_key_value_heads: 2\n  width_importance: weight\n")
    s = load_config(recipe).student
    assert (s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.width_importance) == (448, None, 2, "weight")


@pytest.mark.parametrize("override, needle", [
    ("distill.alpha=1.5", "alpha"),
    ("distill.alpha=-0.1", "alpha"),
    ("distill.temperature=0", "temperature"),
    ("data.seq_len=4", "seq_len"),
    ("data.val_fraction=0.5", "fraction"),
    ("student.layer_selection=random", "layer_selection"),
    ("student.num_layers=0", "num_layers"),
    ("student.width_importance=gradient", "student.width_importance='gradient' is unknown; use auto, activation"),
    ("student.hidden_size=0", "student.hidden_size=0 must be a positive number"),
    ("student.num_key_value_heads=-1", "student.num_key_value_heads=-1 must be a positive number"),
    ("student.hidden_size=abc", "integer"),
    ("output.dtype=int8", "dtype"),
    ("distill.top_k=0", "top_k"),
])
def test_validate_rejects_bad_values(override, needle):
    with pytest.raises(EdgestillError, match=needle):
        load_config(overrides=[override])


def test_validate_direct_alpha_above_one():
    cfg = ShrinkConfig()
    cfg.distill.alpha = 1.01
    with pytest.raises(EdgestillError, match="alpha"):
        validate(cfg)
    cfg.distill.alpha = 1.0  # the boundary is allowed
    validate(cfg)


def test_quant_section_is_the_library_quant_config():
    """The recipe's `quant` section becomes the QuantConfig in one call, short names and all."""
    from edgestill.jobs.shrink import quant_config
    from edgestill.quant import GGUFQ4_0, GGUFQ5_1, GGUFQ8_0, QuantConfig

    assert quant_config(load_config()) is None  # quant.format null: float training
    cfg = load_config(overrides=["quant.format=Q4_0", "quant.plan={lm_head: q8_0, 're:.*down_proj': q5_1}",
                                 "quant.skip=[model.layers.0.mlp.up_proj]", "quant.activations=llama.cpp"])
    assert quant_config(cfg) == QuantConfig(default=GGUFQ4_0(), plan={"lm_head": GGUFQ8_0(), "re:.*down_proj": GGUFQ5_1()},
                                            skip=["model.layers.0.mlp.up_proj"], activations="llama.cpp")
    assert quant_config(cfg) == QuantConfig.from_dict(yaml.safe_load(cfg.to_yaml())["quant"])  # a saved config.yaml


@pytest.mark.parametrize("override, needle", [
    ("quant.format=q4_k", "quant format q4_k is too slow to fake-quantize every step on a CPU; train with f16/q8_0"),
    ("quant.format=int8", "'int8' is not a GGUF training format; use f16, q8_0, q5_1, q5_0, q4_1, q4_0, q3_k or q2_k"),
    ("quant.format=q6_k", "'q6_k' is not a GGUF training format"),
    ("quant.activations=onnx", "quant.activations='onnx' is unknown"),
])
def test_quant_section_validation(override, needle):
    with pytest.raises(EdgestillError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_config(overrides=["quant.format=q4_0", override] if "activations" in override else [override])
