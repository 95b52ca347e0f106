"""Pure-PyTorch references of torchfast's ops, and the helpers their implementations share.

This package sits below both `torchfast.ops` (the dispatcher operators) and `torchfast.triton` (the
Triton kernels): each imports the references and backward formulas from here, and nothing here
imports either of them, so the dependency runs one way. Every reference is differentiable and exact
in float64; the tests compare every implementation against it in higher precision.
"""
