"""`edgestill devices` and `edgestill plan` through the CLI entry point."""

from __future__ import annotations

import json

from plan_fixtures import toy_device  # noqa: F401  (fixture)

from edgestill.cli import main


def test_devices_lists_and_shows_profiles(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "rpi4-4gb" in out and "jetson-orin-nano-8gb" in out and "host" in out
    assert main(["devices", "--show", "rpi5-8gb"]) == 0
    assert "memory_bandwidth_bytes_per_s" in capsys.readouterr().out
    assert main(["devices", "--show", "toaster"]) == 2
    assert "unknown device 'toaster'" in capsys.readouterr().err


def test_plan_writes_ranked_plans_within_budget(tiny_model_dir, tiny_corpus, tmp_path, toy_device, capsys):
    device = tmp_path / "toy.yaml"
    device.write_text(toy_device.to_yaml())
    out = tmp_path / "plans.json"
    rc = main(["plan", "--device", str(device), "--teacher", str(tiny_model_dir), "--data", str(tiny_corpus),
               "--file-size", "150KB", "--depths", "4,2", "--widths", "128", "--calibration-tokens", "64",
               "--formats", "q8_0,q4_0", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["plans"] and all(p["prediction"]["file_bytes"] <= 150_000 for p in data["plans"])
    assert "feasible plans on toy" in capsys.readouterr().out
    # --hidden-sizes adds cut hidden channels to the candidates; a bad size is one line
    assert main(["plan", "--device", str(device), "--teacher", str(tiny_model_dir), "--data", str(tiny_corpus),
                 "--file-size", "150KB", "--depths", "2", "--widths", "128", "--calibration-tokens", "64",
                 "--formats", "q8_0,q4_0", "--hidden-sizes", "64,32", "--out", str(out)]) == 0
    hiddens = {p["shape"]["hidden"] for p in json.loads(out.read_text())["plans"]}
    assert hiddens == {64, 32}, hiddens
    # --probe-steps: the best plans re-ranked by their KL after a few KD steps on train blocks past the calibration
    assert main(["plan", "--device", str(device), "--teacher", str(tiny_model_dir), "--data", str(tiny_corpus),
                 "--file-size", "150KB", "--depths", "4,2", "--widths", "128", "--calibration-tokens", "64",
                 "--formats", "q8_0,q4_0", "--probe-steps", "2", "--probe-top", "2", "--no-correct",
                 "--out", str(out)]) == 0
    assert "by KL after a 2-step recovery probe (the best 2)" in capsys.readouterr().out
    plans = json.loads(out.read_text())["plans"]
    assert [p["recovery"] is not None for p in plans[:2]] == [True, True] and len(plans[0]["recovery"]["losses"]) == 2
    assert plans[0]["recovery"]["rank_kl"] <= plans[1]["recovery"]["rank_kl"]
    assert main(["plan", "--device", str(device), "--teacher", str(tiny_model_dir), "--data", str(tiny_corpus),
                 "--file-size", "150KB", "--depths", "2", "--hidden-sizes", "48"]) == 2
    assert "must be a multiple of 32" in capsys.readouterr().err
    assert main(["plan", "--device", str(device), "--teacher", str(tiny_model_dir), "--data", str(tiny_corpus),
                 "--file-size", "1KB", "--depths", "2", "--widths", "128", "--calibration-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "raise --max-file-size to at least" in err
    # ... and --max-file-size, the name that line uses (and shrink's), is accepted by plan too
    assert main(["plan", "--device", str(device), "--teacher", str(tiny_model_dir), "--data", str(tiny_corpus),
                 "--max-file-size", "1KB", "--depths", "2", "--widths", "128"]) == 2
    assert "raise --max-file-size to at least" in capsys.readouterr().err


def test_plan_refuses_zero_and_nonsense_budgets_in_one_line(capsys):
    for flag in (["--ram", "0"], ["--ram=-5MB"], ["--file-size", "MB"], ["--decode", "0"], ["--prefill=-3"]):
        assert main(["plan", "--device", "rpi5", *flag]) == 2, flag
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("usable size" in err or "not a size" in err or "must be positive" in err), err


def test_a_device_plan_refuses_width_keys_it_does_not_plan(tmp_path):
    """A plan fixes depth, widths and formats; a hidden size or head count set by hand would cut a student it never
    priced (the plan's own hidden cut comes from --hidden-sizes)."""
    from conftest import one_line_error

    from edgestill.config import load_config
    from edgestill.jobs.plan import point_config

    for key in ("hidden_size=448", "num_attention_heads=6", "num_key_value_heads=1"):
        msg = one_line_error(point_config, load_config(overrides=[f"student.{key}"]), None, tmp_path, 1536)
        assert "leave student.hidden_size, student.num_attention_heads and student.num_key_value_heads unset" in msg
