"""torch.export.export of a model using torchfast.nn.Swish: the graph holds the torchfast.swish
operator (not a decomposition), the batch axis stays dynamic, and the ExportedProgram runs and matches
eager, also after a save/load round trip."""

from __future__ import annotations

import torch
from torch import nn

import torchfast
from torchfast.testing import assert_close


def test_exported_program_holds_the_op_and_matches(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), torchfast.nn.Swish(), nn.Linear(16, 4)).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(3, 8),), dynamic_shapes=({0: batch},))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.torchfast.swish.default) == 1, targets
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    for batch in (3, 6):
        x = torch.randn(batch, 8) * 3
        with torch.no_grad():
            expected = model(x)
            assert_close(program.module()(x), expected, what=f"ExportedProgram, batch {batch}")
            assert_close(loaded.module()(x), expected, what=f"loaded ExportedProgram, batch {batch}")
