import numpy as np

from edgestill.evaluate.open_vocab import zero_shot_predict, zero_shot_scores


def test_zero_shot_picks_the_nearest_prompt_among_candidates():
    text = np.eye(4, dtype=np.float32)
    img = np.array([[0.9, 0.1, 0, 0.5], [0, 0.2, 0.1, 0.9]], np.float32)
    assert zero_shot_predict(img, text, [0, 1, 2, 3]).tolist() == [0, 3]
    assert zero_shot_predict(img, text, [1, 2]).tolist() == [1, 1]


def test_scores_separate_seen_heldout_and_all():
    text = np.eye(4, dtype=np.float32)
    seen_img, y_seen = text[[0, 1, 1]], np.array([0, 1, 0])
    held_img, y_held = text[[2, 3]] + text[[0, 0]] * 2, np.array([2, 3])  # nearest overall is a seen prompt
    s = zero_shot_scores(seen_img, y_seen, held_img, y_held, text, [0, 1], [2, 3])
    assert s["seen"] == 2 / 3 and s["heldout"] == 1.0 and s["all"] == 2 / 5
    assert s["chance"] == {"seen": 0.5, "heldout": 0.5, "all": 0.25} and s["n"] == {"seen": 3, "heldout": 2}
