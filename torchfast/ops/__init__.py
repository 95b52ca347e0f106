"""torchfast's operators. Importing this package imports every op module under it, which registers
the op (fake kernel, autograd, autocast, registry entry). A new op is a new file here."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from torchfast._registry import REGISTRY  # noqa: E402
from torchfast.export._tables import register_onnx_symbolics  # noqa: E402
from torchfast.ops.bias_act import bias_act  # noqa: E402
from torchfast.ops.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402
from torchfast.ops.glu import geglu, swiglu  # noqa: E402
from torchfast.ops.swish import swish  # noqa: E402
from torchfast.ops.layer_norm import layer_norm  # noqa: E402
from torchfast.ops.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from torchfast.ops.rope import rope  # noqa: E402

# Every op module has filled its spec's ONNX section by now; register the legacy exporter's symbolics
# for all of them in one place (deferred until torch.onnx is imported, see export/_tables.py).
for _spec in REGISTRY.values():
    register_onnx_symbolics(_spec)

__all__ = ["add_rms_norm", "bias_act", "cross_entropy", "geglu", "layer_norm", "linear_cross_entropy", "rms_norm", "rope", "swiglu", "swish"]
