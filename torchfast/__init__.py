"""torchfast: fused CPU/CUDA/Triton kernels for PyTorch, as real torch.library operators.

    import torchfast
    y = torchfast.swish(x)                  # fused op, differentiable, compile/export friendly
    model = nn.Sequential(nn.Linear(64, 64), torchfast.nn.Swish())
    with torchfast.use_impl("triton"): ...  # choose an implementation per context (or impl= per call)
    print(torchfast.build_info())
    torchfast.Trainer(model, optimizer, loss_fn, amp="auto").fit(dataset, epochs=3, batch_size=64)

    model, report = torchfast.optimize(plain_model)  # swap fused modules into a model you already have

Training toolkit: torchfast.amp, torchfast.distributed, torchfast.hooks, torchfast.profiling and
torchfast.Trainer (docs/training.md). Drop-in optimize: torchfast.optimize (docs/optimize.md).
Compression: torchfast.compress (docs/compress.md). Hugging Face models: torchfast.transformers.patch
(docs/transformers.md).
"""

from torchfast import _ext  # noqa: F401  (loads _C, or warns and falls back to references)
from torchfast import _dtensor
from torchfast import amp, compress, distributed, export, hooks, nn, ops, profiling
from torchfast._info import build_info
from torchfast._optimize import OptimizeReport, OptimizeVerificationError, optimize
from torchfast._registry import REGISTRY, use_impl
from torchfast.ops import (add_rms_norm, bias_act, cross_entropy, geglu, layer_norm, linear_cross_entropy, rms_norm,
                           rope, swiglu, swish)
from torchfast.trainer import FitResult, Trainer

_dtensor.install()  # sharding rules of every op, registered when torch.distributed.tensor is imported

__version__ = "0.1.0"

__all__ = ["REGISTRY", "FitResult", "OptimizeReport", "OptimizeVerificationError", "Trainer", "add_rms_norm", "amp",
           "bias_act", "build_info", "compress", "cross_entropy", "distributed", "export", "geglu", "hooks", "layer_norm", "linear_cross_entropy", "nn",
           "ops", "optimize", "profiling", "rms_norm", "rope", "swiglu", "swish", "use_impl"]


def __getattr__(name: str):
    # torchfast.transformers (docs/transformers.md) on first use: `import torchfast` stays as it was, and
    # the Hugging Face package itself is imported only when patch() runs.
    if name == "transformers":
        import importlib

        return importlib.import_module("torchfast.transformers")
    raise AttributeError(f"module 'torchfast' has no attribute {name!r}")
