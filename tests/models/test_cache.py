import torch

from conftest import load_tiny_teacher
from edgestill.evaluate.speed import measure_speed
from edgestill.models.cache import decode_step


def test_cached_decode_steps_reproduce_the_full_forward(tiny_model_dir):
    model = load_tiny_teacher(tiny_model_dir)
    ids = torch.arange(3, 15).reshape(1, 12)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :8], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(8, 12):
            out = decode_step(model, ids[:, t : t + 1], out)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], atol=1e-4, rtol=1e-4)


def test_measure_speed_reports_both_phases_for_every_model(tiny_model_dir):
    models = {"a": load_tiny_teacher(tiny_model_dir), "b": load_tiny_teacher(tiny_model_dir)}
    speed = measure_speed(models, torch.arange(24).reshape(1, 24), decode_tokens=4, repeats=2, threads=1)
    assert set(speed) == {"a", "b"}
    for s in speed.values():
        assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
