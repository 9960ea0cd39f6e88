"""Build the embedded offline dataset: a class-balanced subset of Fashion-MNIST.

The full files come from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist).
The subset is written in the IDX format torchvision's ``FashionMNIST`` reads, under
``data/embedded/FashionMNIST/raw/``, so the same loading code serves the embedded and the
full data. Fashion-MNIST is (c) Zalando SE, MIT licence.

    python scripts/make_embedded_data.py [--source DIR] [--train-per-class 1000] [--test-per-class 200]
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def find(source: Path, stem: str) -> Path:
    for candidate in (source / stem, source / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {source}. Install Debian's dataset-fashion-mnist package "
        "(apt-get install dataset-fashion-mnist) or pass --source DIR with the four IDX files."
    )


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "embedded")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    raw = args.out / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for part, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        image_stem, label_stem = FILES[part]
        images, labels = read_idx(find(args.source, image_stem)), read_idx(find(args.source, label_stem))
        keep = balanced_subset(labels, per_class, rng)
        write_idx(raw / image_stem, images[keep])
        write_idx(raw / label_stem, labels[keep])
        print(f"{part}: {len(keep)} images ({per_class} per class) -> {raw}")


if __name__ == "__main__":
    main()
