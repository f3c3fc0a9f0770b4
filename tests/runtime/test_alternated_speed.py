"""alternated_speed: several GGUFs timed in turn inside one run, each counted apart, the warm-up rounds left out."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from edgestill.errors import EdgestillError  # noqa: E402
from edgestill.plan import hostbench  # noqa: E402
from edgestill.plan.cost import StudentShape  # noqa: E402
from edgestill.runtime.llamacpp import alternated_speed  # noqa: E402


def test_models_are_timed_in_turn_and_the_bigger_one_decodes_slower(tmp_path, monkeypatch):
    small = hostbench.write_synthetic_gguf(tmp_path / "small.gguf", StudentShape(layers=1, hidden=128, intermediate=256,
                                                                                   heads=4, kv_heads=2, vocab=512), "q8_0")
    big = hostbench.write_synthetic_gguf(tmp_path / "big.gguf", StudentShape(layers=4, hidden=1024, intermediate=2816,
                                                                               heads=8, kv_heads=4, vocab=512), "f16")
    from edgestill.runtime import llamacpp

    order, real = [], llamacpp._time_once
    monkeypatch.setattr(llamacpp, "_time_once", lambda llm, *a: order.append(llm.model_path) or real(llm, *a))
    speeds = alternated_speed({"small": small, "big": big}, prompt_tokens=8, decode_tokens=4, repeats=3, warmup=1)
    assert order == [str(small), str(big)] * 4  # round by round, warm-up included
    for name, path in (("small", small), ("big", big)):
        s = speeds[name]
        assert len(s["decode_samples"]) == len(s["prefill_samples"]) == 3  # the warm-up round is not counted
        assert s["file_bytes"] == path.stat().st_size
        assert s["decode_tokens_per_s_spread"][0] <= s["decode_tokens_per_s"] <= s["decode_tokens_per_s_spread"][1]
    assert speeds["big"]["decode_tokens_per_s"] < speeds["small"]["decode_tokens_per_s"]  # ~400x the weights


def test_nothing_to_time_or_no_repeats_is_refused_in_one_line(tmp_path):
    with pytest.raises(EdgestillError, match="at least one GGUF"):
        alternated_speed({})
    with pytest.raises(EdgestillError, match="must be >= 1"):
        alternated_speed({"x": tmp_path / "x.gguf"}, repeats=0)
