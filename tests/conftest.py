"""Shared fixtures: the tiny BiomedCLIP-shaped backbone and generated datasets. No network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_backbone():
    """The tiny random backbone (seed 0). Shared: tests must not modify its weights."""
    from biomedap.backbone import build_tiny_backbone

    return build_tiny_backbone(seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A generated 4-class dataset in the published split-JSON layout; returns the data root."""
    from biomedap.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root, name="SYNTH", layout="split-json", n_train=12, n_val=4, n_test=8, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_splits(synthetic_root):
    from biomedap.data import load_dataset

    return load_dataset(synthetic_root / "SYNTH")


@pytest.fixture
def feature_cache(tmp_path):
    from biomedap.features import FeatureCache

    return FeatureCache(tmp_path / "cache")
