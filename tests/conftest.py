from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mnist_dir() -> Path | None:
    """MNIST IDX files: $ITERREDUCE_MNIST, else the shared folder beside the checkout."""
    for cand in (os.environ.get("ITERREDUCE_MNIST"), ROOT.parent / "shared" / "data" / "mnist"):
        if cand and (Path(cand) / "train-images-idx3-ubyte.gz").exists():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def mnist_parquet(tmp_path_factory) -> Path:
    """MNIST as Parquet shards (train/ 50000 rows in 8 files, validation/, test/)."""
    src = mnist_dir()
    if src is None:
        pytest.skip("MNIST IDX files not found (set ITERREDUCE_MNIST)")
    from dbn.data import prepare_mnist

    out = tmp_path_factory.mktemp("mnist")
    prepare_mnist(src, out, num_shards=8)
    return out
