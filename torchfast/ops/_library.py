"""Moved to torchfast/_library.py, where torchfast/triton/ reaches it without importing torchfast.ops;
these names stay here for code written against `from torchfast.ops import _library`."""

from torchfast._library import (  # noqa: F401
    define_fallback,
    native_unavailable,
    register_autocast_casting,
    register_autocast_same_dtype,
    register_autograd_fallback,
)
