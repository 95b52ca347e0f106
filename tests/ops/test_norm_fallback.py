"""Without a loadable torchfast._C the normalization ops still work: their schemas are defined from
Python with the references as kernels, and autograd, the modules and opcheck keep working."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["torchfast._C"] = None
    warnings.simplefilter("ignore")
    import torch, torch.nn.functional as F, torchfast
    assert not torchfast._ext.built()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(torchfast.rms_norm(x, w), F.rms_norm(x, (6,), w, 1e-6))
    assert torch.allclose(torchfast.layer_norm(x, w, b), F.layer_norm(x, (6,), w, b, 1e-5))
    y, h = torchfast.add_rms_norm(x, x, w)
    assert torch.allclose(h, 2 * x) and torch.allclose(y, F.rms_norm(2 * x, (6,), w, 1e-6))
    for fn, args in ((torchfast.rms_norm, (x, w)), (torchfast.layer_norm, (x, w, b)),
                     (lambda x, r, w: torchfast.add_rms_norm(x, r, w), (x, x.detach().clone().requires_grad_(), w))):
        assert torch.autograd.gradcheck(fn, args) and torch.autograd.gradgradcheck(fn, args)
    xb = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torchfast.nn.RMSNorm(16)(xb).dtype == torch.bfloat16
    assert torchfast.nn.LayerNorm(16)(xb).dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.torchfast.rms_norm.default, (torch.randn(3, 5).t(), None, 1e-6))
    torch.library.opcheck(torch.ops.torchfast.layer_norm.default,
                          (torch.randn(3, 5, requires_grad=True), torch.ones(5), None, 1e-5))
    print("NORM-FALLBACK-OK")
    """
)


def test_norm_ops_without_compiled_extension_fall_back_to_references():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "NORM-FALLBACK-OK" in out.stdout, out.stdout + out.stderr
