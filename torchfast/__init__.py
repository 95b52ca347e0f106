"""torchfast: fused CPU/CUDA/Triton kernels for PyTorch, as real torch.library operators.

    import torchfast
    y = torchfast.swish(x)                  # fused op, differentiable, compile/export friendly
    model = nn.Sequential(nn.Linear(64, 64), torchfast.nn.Swish())
    with torchfast.use_impl("triton"): ...  # choose an implementation per context (or impl= per call)
    print(torchfast.build_info())
"""

from torchfast import _ext  # noqa: F401  (loads _C, or warns and falls back to references)
from torchfast import export, nn, ops
from torchfast._info import build_info
from torchfast._optimize import OptimizeReport, OptimizeVerificationError, optimize
from torchfast._registry import REGISTRY, use_impl
from torchfast.ops import add_rms_norm, bias_act, geglu, layer_norm, rms_norm, swiglu, swish

__version__ = "0.1.0"
__all__ = ["REGISTRY", "add_rms_norm", "bias_act", "build_info", "export", "geglu", "layer_norm", "nn", "ops",
           "optimize", "OptimizeReport", "OptimizeVerificationError", "rms_norm", "swiglu", "swish", "use_impl"]
