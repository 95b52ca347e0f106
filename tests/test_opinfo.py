"""Conformance against PyTorch's own OpInfo samples (torchfast/testing/opinfo.py maps them): every
sample of silu, gelu, relu, rms_norm, layer_norm and cross_entropy, and its non-contiguous twin, run
through torchfast in each float dtype and under each CPU ISA variant this machine can run; outputs
and gradients against PyTorch's op in float64. The counts are in docs/testing.md."""

import importlib

import pytest
import torch

import torchfast
from torchfast.testing import opinfo

pytest.importorskip("expecttest", reason="PyTorch's OpInfo database imports only with expecttest (test extra)")

ISAS = torchfast._ext.runnable_cpu_isas() or [None]  # None: the build without _C, one variant

# Checked calls, at least: (in float32, in the other dtypes), which lack the large samples (torch 2.13
# gives exactly these; see docs/testing.md). A torch upgrade that drops samples, or a mapper that
# starts skipping them, fails here instead of passing on fewer checks.
FLOORS = {
    "nn.functional.silu": (114, 108),
    "nn.functional.gelu": (32, 32),
    "nn.functional.relu": (118, 112),
    "nn.functional.rms_norm": (10, 10),
    "nn.functional.layer_norm": (10, 10),
    "nn.functional.cross_entropy": (16, 16),
}
# The reasons a sample may be left unchecked; a new one fails the test until it is named here and in
# docs/testing.md.
KNOWN_SKIPS = {
    opinfo.LARGE_SKIP,
    "probability targets (torchfast takes class indices)",
    "class weights (torchfast has no weight argument)",
}
KNOWN_REJECTS = {"eps < 0 (torchfast requires eps >= 0)"}


@pytest.fixture(scope="module")
def infos():
    return opinfo.op_infos()


@pytest.mark.parametrize("dtype", opinfo.FLOAT_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(opinfo.MAPPERS))
def test_opinfo_samples(infos, name, dtype, restore_cpu_isa):
    outcomes, counts = opinfo.outcomes(infos[name], dtype)
    floor = FLOORS[name][0 if dtype == torch.float32 else 1]
    assert counts.cases >= floor, (
        f"{name} {dtype}: only {counts.cases} samples checked (floor {floor}); "
        f"rejected {dict(counts.rejected)}, skipped {dict(counts.skipped)}")
    assert set(counts.skipped) <= KNOWN_SKIPS, f"{name}: unexpected skip reasons {set(counts.skipped) - KNOWN_SKIPS}"
    assert set(counts.rejected) <= KNOWN_REJECTS, f"{name}: unexpected rejections {set(counts.rejected) - KNOWN_REJECTS}"
    for o in outcomes:
        if isinstance(o, opinfo.Case):
            opinfo.check_case(o, ISAS)
        elif isinstance(o, opinfo.Rejected):
            opinfo.check_rejected(o)


def test_opinfo_error_inputs(infos):
    """OpInfo's own bad calls that have a torchfast counterpart are refused with torchfast's message."""
    rejected = [o for name in opinfo.MAPPERS for o in opinfo.error_outcomes(infos[name])
                if isinstance(o, opinfo.Rejected)]
    assert len(rejected) >= 2  # gelu's unknown `approximate`, rms_norm's weight of the wrong shape
    for r in rejected:
        opinfo.check_rejected(r)


def test_importing_op_db_leaves_torch_as_it_was(infos):
    """PyTorch's test utilities freeze torch.backends flags and switch the hypothesis profile when
    imported; op_infos() undoes that, so tests that run later in the same process are unaffected."""
    assert len(infos) == len(opinfo.MAPPERS)
    assert not torch.backends.flags_frozen()
    hypothesis = pytest.importorskip("hypothesis")
    # Hypothesis itself loads its "ci" profile when it sees a CI environment (CI=true and the like).
    in_ci = getattr(importlib.import_module("hypothesis._settings"), "is_in_ci", lambda: False)()
    assert hypothesis.settings.get_current_profile_name() == ("ci" if in_ci else "default")
