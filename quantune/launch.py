"""Triton kernels launched with less host time: a compiled kernel's launcher called directly.

``kernel[grid](*args, **kwargs)`` costs Triton's Python on every call: it binds the arguments, specializes
each one (dtype, 16-byte alignment, integer width, divisibility by 16), hashes that into its cache key,
checks the globals the kernel read and builds launch metadata, before its C launcher runs. A decode step
of a small model launches a few hundred kernels and is bound by exactly that host time when it runs
eagerly, without a CUDA graph (eval/profile_launch.py times the pieces).

:func:`launch` keeps each compiled kernel under a key that tells apart everything Triton's specialization
tells apart -- each positional argument's dtype and 16-byte alignment (tensors) or width, whether it is 1
and whether 16 divides it (integers); every keyword's value (constexprs and launch options); the device --
and on a repeat calls the compiled kernel's launcher with the arguments Triton's ``run`` would pass it.
Triton's own path serves the first launch of each key, call sites that give a constexpr by position or a
plain argument by keyword, an unfamiliar Triton (no ``CompiledKernel.run``/``function``/``packed_metadata``),
launch or pre-run hooks (profilers), the interpreter's kernels (``TRITON_INTERPRET=1``) and :data:`FAST_LAUNCH` off.

The key is never coarser than Triton's own, so a repeat runs the kernel Triton would have picked. What is
not repeated is Triton's check that module globals the kernel read are unchanged since its compilation
(the kernels here read none that change).
"""
from __future__ import annotations

import inspect

import torch

try:
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # no triton, or one without knobs: Triton's path always (or no launch at all)
    _knobs = _JITFunction = None

FAST_LAUNCH = True  # call a compiled kernel's launcher directly on a repeat launch (False: Triton's path always)

_COMPILED: dict = {}  # key -> (launcher, function, packed metadata, the constexprs' values in the kernel's order)
_Tensor = torch.Tensor


def _spec(v):
    """What Triton's specialization can tell apart in a plain (not constexpr) argument, or more."""
    if isinstance(v, _Tensor):
        return v.dtype, not v.data_ptr() & 15
    if v.__class__ is int:
        return v == 1, not v & 15, -2147483648 <= v < 2147483648, v < 9223372036854775808
    return v if v is None or v.__class__ is bool else v.__class__


def _tail(fn, n: int, kwargs: dict) -> tuple | None:
    """The values of the kernel's parameters after the first ``n`` (positional) ones, in its order, when all
    of them are constexprs (given by keyword or by default) and none of the first ``n`` is one; else None."""
    constexpr = set(fn.constexprs)
    if any(i in constexpr for i in range(n)):
        return None
    tail = []
    for param in fn.params[n:]:
        if param.num not in constexpr:
            return None
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif param.default is not inspect.Parameter.empty:
            tail.append(param.default)
        else:
            return None
    return tuple(tail)


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler such as proton): such launches take Triton's own path.
    Triton keeps its hooks in chains, empty unless something added one."""
    runtime = getattr(_knobs, "runtime", None)
    if runtime is None:
        return True
    return any(hook is not None and bool(getattr(hook, "calls", True))
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def launch(fn, grid: tuple, *args, **kwargs):
    """``fn[grid](*args, **kwargs)`` for a ``@triton.jit`` function ``fn`` (plain arguments by position,
    constexprs and launch options by keyword), Triton's per-call Python skipped on a repeat (see the module's
    docstring). ``grid``: one to three ints. Returns the compiled kernel on Triton's path, else None."""
    if not FAST_LAUNCH or _JITFunction is None or type(fn) is not _JITFunction or fn.pre_run_hooks or _hooked():
        return fn[grid](*args, **kwargs)
    device = torch.cuda.current_device()
    key = (fn, device, len(args), tuple(kwargs.items()), tuple(map(_spec, args)))
    try:
        hit = _COMPILED.get(key)
    except TypeError:  # an unhashable keyword value: Triton's path
        return fn[grid](*args, **kwargs)
    if hit is None:
        kernel = fn[grid](*args, **kwargs)
        tail = _tail(fn, len(args), kwargs)
        run = None if hasattr(kernel, "result") else getattr(kernel, "run", None)
        function = getattr(kernel, "function", None)
        if tail is not None and run is not None and function is not None and hasattr(kernel, "packed_metadata"):
            _COMPILED[key] = (run, function, kernel.packed_metadata, tail)
        return kernel
    run, function, metadata, tail = hit
    g = len(grid)
    run(grid[0], grid[1] if g > 1 else 1, grid[2] if g > 2 else 1, torch._C._cuda_getCurrentRawStream(device),
        function, metadata, None, None, None, *args, *tail)
    return None


def clear() -> None:
    """Forget the compiled kernels kept here (Triton's own cache stays)."""
    _COMPILED.clear()
