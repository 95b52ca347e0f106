"""Drop-in modules: same constructors, parameter names and state_dicts as the torch.nn classes they
replace, computed by torchfast's fused ops."""

from torchfast.nn.cross_entropy import CrossEntropyLoss, LinearCrossEntropyLoss
from torchfast.nn.gelu import GELU
from torchfast.nn.glu import GeGLU, SwiGLU
from torchfast.nn.linear import Linear
from torchfast.nn.swish import SiLU, Swish
from torchfast.nn.layer_norm import LayerNorm
from torchfast.nn.rms_norm import AddRMSNorm, RMSNorm

__all__ = ["GELU", "GeGLU", "Linear", "SiLU", "SwiGLU", "Swish"]
__all__ += ["AddRMSNorm", "LayerNorm", "RMSNorm"]
__all__ += ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
