"""torchfast's operators. Importing this package imports every op module under it, which registers
the op (fake kernel, autograd, autocast, registry entry). A new op is a new file here."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from torchfast.ops.swish import swish  # noqa: E402
from torchfast.ops.layer_norm import layer_norm  # noqa: E402
from torchfast.ops.rms_norm import add_rms_norm, rms_norm  # noqa: E402

__all__ = ["swish"]
__all__ += ["add_rms_norm", "layer_norm", "rms_norm"]
