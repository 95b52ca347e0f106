"""TorchScript: torch.jit.script and torch.jit.trace of a model using torchfast.nn.Swish call the
torchfast::swish operator, and the saved files load and run in a fresh process that imports torchfast
(and only there: the files reference the op, they do not carry a copy of it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast
from torchfast.testing import assert_close

from .fresh import run_fresh


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), torchfast.nn.Swish(), nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The scripted and traced model, saved, with the eager output on an input of another batch size."""
    folder = tmp_path_factory.mktemp("jit")
    model = make_model()
    compiled = {"script": torch.jit.script(model), "trace": torch.jit.trace(model, (torch.randn(3, 8),))}
    x = torch.randn(5, 8) * 3
    for kind, module in compiled.items():
        module.save(str(folder / f"{kind}.pt"))
    torch.save(x, folder / "x.pt")
    with torch.no_grad():
        return folder, compiled, x, model(x)


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_graph_calls_the_torchfast_op_and_matches_eager(saved, kind):
    _, compiled, x, expected = saved
    graph = str(compiled[kind].inlined_graph)
    assert "torchfast::swish" in graph, graph
    assert "aten::sigmoid" not in graph and "aten::silu" not in graph, graph
    with torch.no_grad():
        assert_close(compiled[kind](x), expected)


LOAD_IN_FRESH_PROCESS = r"""
import sys, torch
folder = sys.argv[1]
for kind in ("script", "trace"):
    try:
        torch.jit.load(f"{folder}/{kind}.pt")
    except RuntimeError as e:
        assert "torchfast::swish" in str(e), e
    else:
        raise AssertionError(f"{kind}.pt loaded without torchfast: it does not call the torchfast op")
import torchfast
x = torch.load(f"{folder}/x.pt")
with torch.no_grad():
    torch.save({kind: torch.jit.load(f"{folder}/{kind}.pt")(x) for kind in ("script", "trace")},
               f"{folder}/out.pt")
"""


def test_saved_files_load_and_run_in_a_fresh_process(saved):
    folder, _, _, expected = saved
    run_fresh(LOAD_IN_FRESH_PROCESS, str(folder), cwd=folder)
    outputs = torch.load(folder / "out.pt")
    for kind in ("script", "trace"):
        assert_close(outputs[kind], expected, what=f"{kind}.pt in a fresh process")
