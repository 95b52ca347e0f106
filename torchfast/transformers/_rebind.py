"""A module's forward with one module-level name seen differently, for one instance only.

Some transformers attentions (Phi-3's) call a module-level `apply_rotary_pos_emb` with no kernel hook.
Assigning torchfast's function to that module attribute would change every model of the class in the
process; a flag or context variable read by a replacement function would make every call of every
model pay for the dispatch and be one more piece of global state to keep right under threads and
torch.compile. Instead, patch binds to the one instance a copy of the class's forward: the same code
object (transformers' own source, nothing rewritten), whose globals are a copy of its module's
namespace with that one name pointing to torchfast's function. Other instances keep the class's
forward; unpatch drops the instance attribute.

Decorators written with functools.wraps (transformers' `deprecate_kwarg`) keep the function they wrap
in a closure cell and as `__wrapped__`: the chain is rebuilt, each wrapper copied with its cell pointing
to the copied function below it, so the instance's forward still runs the decorators' argument
handling. A chain of another shape raises CannotRebind, and patch then leaves the part as it is.
"""

from __future__ import annotations

import types


class CannotRebind(Exception):
    """The function's decorators are not functools.wraps wrappers holding the wrapped function in a
    closure cell, so the copy cannot be built."""


def _cell_holds(cell: types.CellType, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _copy(fn: types.FunctionType, globals_: dict, closure) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    for attr in ("__qualname__", "__module__", "__doc__", "__annotations__"):
        setattr(new, attr, getattr(fn, attr))
    return new


def with_global(fn, module_globals: dict, name: str, value) -> types.FunctionType:
    """A copy of `fn` in which the code defined in the module whose namespace is `module_globals` sees
    the global `name` as `value`; wrappers around it (functools.wraps, through `__wrapped__`) are copied
    around the copy. The namespace is a snapshot taken now: the module's other globals are the same
    objects, but a name the module rebinds later is not seen by the copy."""
    if not isinstance(fn, types.FunctionType):
        raise CannotRebind(f"{fn!r} is not a Python function")
    if fn.__globals__ is module_globals:
        if name not in fn.__code__.co_names:
            raise CannotRebind(f"{fn.__qualname__} does not use the global {name!r}")
        namespace = dict(module_globals)
        namespace[name] = value
        return _copy(fn, namespace, fn.__closure__)
    inner = getattr(fn, "__wrapped__", None)
    cells = fn.__closure__ or ()
    if inner is None or not any(_cell_holds(c, inner) for c in cells):
        raise CannotRebind(f"{fn.__qualname__} wraps its function in a way that cannot be copied")
    new_inner = with_global(inner, module_globals, name, value)
    closure = tuple(types.CellType(new_inner) if _cell_holds(c, inner) else c for c in cells)
    new = _copy(fn, fn.__globals__, closure)
    new.__wrapped__ = new_inner
    return new
