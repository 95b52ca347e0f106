"""Without a loadable torchfast._C, import still works: one warning, and every op runs its reference."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["torchfast._C"] = None  # makes `from torchfast import _C` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, torchfast
    ours = [w for w in caught if "torchfast" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    msg = str(ours[0].message)
    assert "not available" in msg and "pip install --no-build-isolation" in msg, msg

    assert torchfast.build_info()["compiled"] is False
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torchfast.swish(x)
    assert torch.allclose(y, x * torch.sigmoid(x))
    assert torch.autograd.gradcheck(torchfast.swish, (x,))
    assert torch.autograd.gradgradcheck(torchfast.swish, (x,))
    xb = torch.randn(7, dtype=torch.bfloat16)
    assert torchfast.nn.Swish()(xb).dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.torchfast.swish.default, (torch.randn(4, 4, requires_grad=True),))
    try:
        torchfast.swish(x, impl="native")
    except RuntimeError as e:
        assert "torchfast._C is not built" in str(e), e
    else:
        raise AssertionError("impl='native' without _C should fail")
    print("FALLBACK-OK")
    """
)


def test_import_without_compiled_extension_falls_back_to_references():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "FALLBACK-OK" in out.stdout, out.stdout + out.stderr
