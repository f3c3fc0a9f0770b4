import numpy as np
import pytest
from PIL import Image

from edgestill.data.images import DIGIT_NAMES, MNIST_5K, ImageDataConfig, load_images, split
from edgestill.data.views import LowLightConfig, derive, low_light
from edgestill.errors import EdgestillError


def _folder(root, views=("rgb", "ir"), classes=("cat", "dog", "sea_lion"), per=4, drop=None):
    rng = np.random.default_rng(0)
    for view in views:
        for c in classes:
            (root / view / c).mkdir(parents=True, exist_ok=True)
            for i in range(per):
                if (view, c, i) == drop:
                    continue
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / view / c / f"{i}.png")
    return root


def test_mnist_5k_is_real_digits_and_split_keeps_heldout_out():
    cfg = ImageDataConfig()
    images = load_images(cfg, derived_second=True)
    assert images.x.shape == (5000, 1, 28, 28) and images.classes == list(DIGIT_NAMES)
    assert np.bincount(images.y).tolist() == [500] * 10
    assert 0 <= images.x.min() and images.x.max() <= 1 and images.x.mean() > 0.05  # strokes, not blank
    s = split(images, cfg)
    assert s.heldout_classes == [7, 8, 9] and s.seen_classes == list(range(7))
    for part in (s.train, s.val, s.test):
        assert not np.isin(images.y[part], [7, 8, 9]).any()
    assert len(s.heldout) == 1500 and (len(s.train), len(s.val), len(s.test)) == (2450, 350, 700)
    assert not set(s.train) & set(s.test) and not set(s.train) & set(s.val)
    assert np.array_equal(split(images, cfg).test, s.test)  # fixed by data.split_seed


def test_folder_with_real_paired_view(tmp_path):
    root = _folder(tmp_path)
    cfg = ImageDataConfig(path=str(root), second_view="ir", channels=3, size=8, heldout=["sea lion"])
    images = load_images(cfg, derived_second=False)
    assert images.classes == ["cat", "dog", "sea lion"] and images.x.shape == (12, 3, 8, 8)
    assert images.second.shape == images.x.shape and not np.array_equal(images.second, images.x)
    s = split(images, cfg)
    assert s.heldout_classes == [2] and len(s.heldout) == 4


@pytest.mark.parametrize("case, message", [
    ("missing pair", "has no paired view"),
    ("missing view", "the paired view"),
    ("unreadable", "cannot read image"),
    ("no classes", "has no class folders"),
    ("unknown heldout", "not classes of"),
    ("one view mnist", "has one view only"),
])
def test_bad_image_input_gets_one_clear_line(tmp_path, case, message):
    cfg = ImageDataConfig(path=str(tmp_path), second_view="ir", heldout=["dog"])
    derived = False
    if case == "missing pair":
        _folder(tmp_path, drop=("ir", "dog", 2))
    elif case == "missing view":
        _folder(tmp_path, views=("rgb",))
    elif case == "unreadable":
        _folder(tmp_path)
        (tmp_path / "rgb" / "cat" / "0.png").write_bytes(b"not an image")
    elif case == "no classes":
        (tmp_path / "rgb").mkdir()
    elif case == "unknown heldout":
        _folder(tmp_path)
        cfg.heldout = ["zebra"]
    else:
        cfg.path = MNIST_5K
    with pytest.raises(EdgestillError, match=message):
        images = load_images(cfg, derived_second=derived)
        split(images, cfg)


def test_low_light_follows_the_sensor_model():
    x = np.full((20000,), 1.0, np.float32)
    cfg = LowLightConfig(electrons_at_white=4.0, read_noise=0.0, bits=16, headroom=4.0)
    y = low_light(x, cfg)
    # Poisson(4) electrons, scaled by 1/4: mean 1, variance 4/16 (the headroom clips only above 16)
    assert abs(y.mean() - 1.0) < 0.03 and abs(y.var() - 0.25) < 0.02
    assert np.array_equal(low_light(x, cfg), y)  # one fixed capture
    black = low_light(np.zeros(20000, np.float32), LowLightConfig(read_noise=1.0, bits=16))
    assert black.min() == 0 and black.mean() > 0  # read noise, clipped at the ADC's zero
    coarse = low_light(np.linspace(0, 1, 1000, dtype=np.float32), LowLightConfig(bits=2))
    assert set(np.unique(coarse / 2 * 3).round(6)) <= {0, 1, 2, 3}  # 4 levels over [0, headroom 2]
    with pytest.raises(EdgestillError, match="unknown derived view"):
        derive("thermal", x, cfg)
    with pytest.raises(EdgestillError, match="electrons_at_white"):
        low_light(x, LowLightConfig(electrons_at_white=0))
