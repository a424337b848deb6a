import pytest
import torch

from tests.reference_pipeline import build_pipeline

_pipelines = {}


@pytest.fixture(scope="session")
def reference_pipeline():
    """Builds diffusers' reference pipeline (tiny, random, offline) once per dtype."""
    def get(dtype=torch.float32):
        if dtype not in _pipelines:
            _pipelines[dtype] = build_pipeline(dtype)
        return _pipelines[dtype]
    return get
