"""The model shapes the benchmarks use parse into the sizes their names promise."""

import os

import pytest

from jaxserve.config import ModelConfig

SHAPES = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "model_shapes")


@pytest.mark.parametrize("name, layers, hidden, experts", [
    ("llama3-8b", 32, 4096, 0), ("llama3-70b", 80, 8192, 0), ("mixtral-8x7b", 32, 4096, 8)])
def test_shape_parses(name, layers, hidden, experts):
    c = ModelConfig.from_dir(os.path.join(SHAPES, name))
    assert (c.num_layers, c.hidden_size, c.num_experts) == (layers, hidden, experts)
