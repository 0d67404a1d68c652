from __future__ import annotations

from pathlib import Path

import pytest

from fdet.data import ShapesPaths, generate_shapes

SIZE = 64


@pytest.fixture(scope="session")
def shapes_set(tmp_path_factory: pytest.TempPathFactory) -> ShapesPaths:
    """A small shapes set shared by the data tests: 40 train and 8 val images of 64 px."""
    root = tmp_path_factory.mktemp("shapes") / "set"
    return generate_shapes(root, train=40, val=8, size=SIZE, seed=3, min_object_size=6)


@pytest.fixture
def tiny_set(tmp_path: Path) -> ShapesPaths:
    """A fresh, writable tiny set: 4 train and 2 val images of 32 px."""
    return generate_shapes(tmp_path / "tiny", train=4, val=2, size=32, seed=5, min_object_size=4)
