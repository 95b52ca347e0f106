"""Drop-in modules: same constructors, parameter names and state_dicts as the torch.nn classes they
replace, computed by torchfast's fused ops."""

from torchfast.nn.swish import SiLU, Swish

__all__ = ["SiLU", "Swish"]
