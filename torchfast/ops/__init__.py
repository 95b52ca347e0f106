"""torchfast's operators. Importing this package imports every op module under it, which registers
the op (fake kernel, autograd, autocast, registry entry). A new op is a new file here."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from torchfast.ops.bias_act import bias_act  # noqa: E402
from torchfast.ops.glu import geglu, swiglu  # noqa: E402
from torchfast.ops.swish import swish  # noqa: E402

__all__ = ["bias_act", "geglu", "swiglu", "swish"]
