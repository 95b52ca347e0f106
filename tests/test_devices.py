"""Every op refuses tensor arguments on different devices, naming the op, the argument and both devices,
before any kernel runs. Cases are generated from each registered op's sample inputs, so a new op is
covered without editing this file:
- the public function, with each tensor argument moved to meta in turn, for every implementation name
  (the check is in `select`, before an implementation is chosen, so "triton" is checked even where
  Triton is missing);
- the raw dispatcher ops (forward and backward, as a native forward+backward calls them), with each
  tensor argument on meta: such a call dispatches to the Meta (fake) kernel;
- with the extension built, the same calls sent straight to the C++ CPU kernels (redispatch to the CPU
  key), whose own checks must refuse the meta argument before reading any data.
CUDA index mixes are in the `gpu` cases at the end."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchfast

OPS = sorted(torchfast.REGISTRY)
IMPLS = ["native", "reference", "triton"]


def _sample(name, device="cpu"):
    args, kwargs = torchfast.REGISTRY[name].sample_inputs(torch.device(device), torch.float32)[0]
    return list(args), dict(kwargs)


def _public_cases():
    cases = []
    for name in OPS:
        args, kwargs = _sample(name)
        params = list(inspect.signature(torchfast.REGISTRY[name].function).parameters)
        tensors = [(params[i], ("arg", i)) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        tensors += [(k, ("kw", k)) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        if len(tensors) > 1:  # one tensor argument cannot disagree with itself
            cases += [pytest.param(name, arg, where, id=f"{name}-{arg}") for arg, where in tensors]
    return cases


def _moved(args, kwargs, where, device="meta"):
    args, kwargs = list(args), dict(kwargs)
    kind, key = where
    if kind == "arg":
        args[key] = args[key].to(device)
    else:
        kwargs[key] = kwargs[key].to(device)
    return args, kwargs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,arg,where", _public_cases())
def test_public_function_refuses_a_meta_argument(name, arg, where, impl):
    args, kwargs = _moved(*_sample(name), where)
    with pytest.raises(RuntimeError, match=rf"torchfast\.{name}: .*'{arg}'.*(meta|cpu)"):
        torchfast.REGISTRY[name].function(*args, impl=impl, **kwargs)


class _Record(TorchDispatchMode):
    """Records every torchfast:: operator call (forward and backward) that reaches the backends."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "torchfast":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _op_calls(name):
    """(overload, args, kwargs) of each torchfast op a native forward + backward of `name` runs."""
    args, kwargs = _sample(name)
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    with _Record() as rec:
        out = torchfast.REGISTRY[name].function(*args, impl="native", **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        sum(o.float().square().sum() for o in outs).backward()
    return rec.calls


def _raw_cases():
    cases, seen = [], set()
    for name in OPS:
        for func, args, kwargs in _op_calls(name):
            schema_args = [a.name for a in func._schema.arguments]
            bound = [*zip(schema_args, args), *kwargs.items()]
            tensors = [n for n, v in bound if isinstance(v, torch.Tensor)]
            if len(tensors) < 2:
                continue
            for arg in tensors:
                key = (func.name(), arg)
                if key not in seen:
                    seen.add(key)
                    cases.append(pytest.param(name, func.name(), arg, id=f"{func.name().split('::')[1]}-{arg}"))
    return cases


def _raw_call(name, qualname, arg, device="meta"):
    """The recorded call of `qualname` (from a forward + backward of `name`) with `arg` moved to `device`."""
    for func, args, kwargs in _op_calls(name):
        if func.name() == qualname:
            names = [a.name for a in func._schema.arguments]
            args, kwargs = list(args), dict(kwargs)
            if arg in kwargs:
                kwargs[arg] = kwargs[arg].to(device)
            else:
                i = names.index(arg)
                args[i] = args[i].to(device)
            return func, args, kwargs
    raise AssertionError(f"{qualname} was not called")


RAW_CASES = _raw_cases() if torchfast._ext.built() else []  # the native ops run only when built


@pytest.mark.parametrize("name,qualname,arg", RAW_CASES)
def test_raw_op_refuses_a_meta_argument(name, qualname, arg):
    func, args, kwargs = _raw_call(name, qualname, arg)
    op = qualname.split("::")[1]
    with pytest.raises(RuntimeError, match=rf"torchfast\.{op}: .*'{arg}'"):
        func(*args, **kwargs)


@pytest.mark.skipif(not torchfast._ext.built(), reason="the C++ extension is not built")
@pytest.mark.parametrize("name,qualname,arg", RAW_CASES)
def test_cpu_kernel_refuses_a_meta_argument(name, qualname, arg):
    """The C++ checks themselves: the CPU kernel called directly, past the dispatcher's choice of Meta.
    A missing check here reads a meta tensor's (null) data pointer."""
    func, args, kwargs = _raw_call(name, qualname, arg)
    op = qualname.split("::")[1]
    with pytest.raises(RuntimeError, match=re.escape(f"torchfast.{op}: ") + f".*'{arg}'.*same device"):
        func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)


def test_error_names_both_devices():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"torchfast\.rms_norm: 'x' is on cpu but 'weight' is on meta; "
                                           r"they must be on the same device"):
        torchfast.rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(RuntimeError, match=r"torchfast\.swiglu: 'gate' is on cpu but 'up' is on meta"):
        torch.ops.torchfast.swiglu(x, x.to("meta"))


def test_all_meta_still_works():
    """A call with every argument on meta is a shape computation, not a mix: it must keep working."""
    for name in OPS:
        args, kwargs = _sample(name, "meta")
        torchfast.REGISTRY[name].function(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["native", "triton", "reference"])
@pytest.mark.parametrize("name,arg,where", _public_cases())
def test_cuda_and_cpu_mix_refused(name, arg, where, impl):
    args, kwargs = _sample(name, "cuda")
    args, kwargs = _moved(args, kwargs, where, "cpu")
    with pytest.raises(RuntimeError, match=rf"torchfast\.{name}: .*'{arg}'"):
        torchfast.REGISTRY[name].function(*args, impl=impl, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name,arg,where", _public_cases())
def test_two_cuda_devices_refused(name, arg, where):
    args, kwargs = _sample(name, "cuda:0")
    args, kwargs = _moved(args, kwargs, where, "cuda:1")
    with pytest.raises(RuntimeError, match=rf"torchfast\.{name}: .*'{arg}'"):
        torchfast.REGISTRY[name].function(*args, **kwargs)
