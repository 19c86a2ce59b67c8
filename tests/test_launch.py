"""quantune.launch: repeat launches go to the compiled kernel's launcher, under a key never coarser than
Triton's specialization. On the CPU a real JITFunction's compile-and-launch is replaced by a recorder; the
GPU test compares the layer's outputs with and without the direct launches."""
from __future__ import annotations

import copy

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

from quantune import launch as L  # noqa: E402


def _body(x_ptr, y_ptr, n, K: "tl.constexpr", MODE: "tl.constexpr" = 3):  # noqa: F821 - never compiled here
    pass


class _Compiled:
    """What Triton's run returns: a launcher, a function handle, packed metadata."""

    def __init__(self, calls):
        self.calls, self.function, self.packed_metadata = calls, object(), ("meta",)

    def run(self, *args):
        self.calls.append(("direct", args))


@pytest.fixture
def kernel(monkeypatch):
    """A real JITFunction whose Triton path records its calls (and returns a compiled-kernel stand-in)."""
    fn = JITFunction(_body)
    calls = []
    compiled = _Compiled(calls)

    def run(*args, grid, warmup, **kwargs):
        calls.append(("triton", args, kwargs, grid))
        return compiled

    monkeypatch.setattr(fn, "run", run)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    monkeypatch.setattr(L, "FAST_LAUNCH", True)
    L.clear()
    yield fn, calls, compiled
    L.clear()


def _kinds(calls):
    return [c[0] for c in calls]


def test_repeat_goes_to_the_launcher_with_triton_s_arguments(kernel):
    fn, calls, compiled = kernel
    x, y = torch.zeros(64), torch.zeros(64)
    assert L.launch(fn, (4, 2), x, y, 64, K=32, num_warps=4) is compiled  # first: Triton's path
    assert L.launch(fn, (4, 2), x, y, 64, K=32, num_warps=4) is None
    assert _kinds(calls) == ["triton", "direct"]
    grid0, grid1, grid2, stream, function, metadata, launch_metadata, enter, exit_, *values = calls[1][1]
    assert (grid0, grid1, grid2, stream) == (4, 2, 1, 1234)
    assert function is compiled.function and metadata == compiled.packed_metadata
    assert (launch_metadata, enter, exit_) == (None, None, None)
    assert values[:3] == [x, y, 64] and values[3:] == [32, 3]  # every parameter in order, the default too


@pytest.mark.parametrize("change", [
    lambda x, y: ((x, y, 64), {"K": 64, "num_warps": 4}),        # another constexpr value
    lambda x, y: ((x, y, 64), {"K": 32, "num_warps": 8}),        # another launch option
    lambda x, y: ((x, y, 64), {"K": 32, "MODE": 3, "num_warps": 4}),  # the default given: another call site
    lambda x, y: ((x[1:], y, 64), {"K": 32, "num_warps": 4}),    # a tensor off its 16-byte alignment
    lambda x, y: ((x.double(), y, 64), {"K": 32, "num_warps": 4}),  # another dtype
    lambda x, y: ((x, y, 65), {"K": 32, "num_warps": 4}),        # an int 16 no longer divides
    lambda x, y: ((x, y, 1), {"K": 32, "num_warps": 4}),         # the int 1
    lambda x, y: ((x, y, 2 ** 33), {"K": 32, "num_warps": 4}),   # a 64-bit int
])
def test_anything_triton_tells_apart_is_a_new_compilation(kernel, change):
    fn, calls, _ = kernel
    x, y = torch.zeros(64), torch.zeros(64)
    L.launch(fn, (4,), x, y, 64, K=32, num_warps=4)
    args, kwargs = change(x, y)
    L.launch(fn, (4,), *args, **kwargs)
    assert _kinds(calls) == ["triton", "triton"]


def test_what_triton_does_not_tell_apart_is_a_hit(kernel):
    fn, calls, _ = kernel
    L.launch(fn, (4,), torch.zeros(64), torch.zeros(64), 64, K=32)
    L.launch(fn, (9,), torch.zeros(640), torch.ones(8), 4096, K=32)  # other tensors, sizes, a multiple of 16
    assert _kinds(calls) == ["triton", "direct"]
    assert calls[1][1][0] == 9


def test_call_sites_that_cannot_be_replayed_keep_triton_s_path(kernel, monkeypatch):
    fn, calls, _ = kernel
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(2):
        L.launch(fn, (4,), x, y, 64, 32)  # a constexpr by position: its value is not in the key
        L.launch(fn, (4,), x, y, n=64, K=32)  # a plain argument by keyword
    assert _kinds(calls) == ["triton"] * 4
    monkeypatch.setattr(L, "FAST_LAUNCH", False)
    for _ in range(2):
        L.launch(fn, (4,), x, y, 64, K=32)
    assert _kinds(calls) == ["triton"] * 6


def test_launch_hooks_keep_triton_s_path(kernel, monkeypatch):
    fn, calls, _ = kernel
    L.launch(fn, (4,), torch.zeros(64), torch.zeros(64), 64, K=32)
    chain = triton.knobs.runtime.launch_enter_hook
    hook = lambda *args: None  # noqa: E731
    if hasattr(chain, "calls"):  # a chain of hooks (newer Triton): one hook in it
        monkeypatch.setattr(chain, "calls", [hook])
    else:
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(2):
        L.launch(fn, (4,), x, y, 64, K=32)
    assert _kinds(calls) == ["triton"] * 3  # the empty chain let the first be kept; the hook sends both back


def test_an_unfamiliar_compiled_kernel_is_not_kept(kernel, monkeypatch):
    fn, calls, compiled = kernel
    del compiled.packed_metadata
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(2):
        L.launch(fn, (4,), x, y, 64, K=32)
    assert _kinds(calls) == ["triton", "triton"]


def test_functions_that_are_not_jit_functions_are_called_as_given():
    seen = []

    class Interpreted:  # what TRITON_INTERPRET=1 makes of a kernel
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    L.launch(Interpreted(), (2,), 1, K=3)
    assert seen == [((2,), (1,), {"K": 3})]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["rtn-4", "rtn-2", "kashin-4", "kashin-2", "rtn-3"])
def test_direct_launches_compute_what_triton_s_path_computes(fmt, monkeypatch):
    from quantune.config import QuantConfig
    from quantune.quantize import quantize_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 768, bias=False)).cuda().to(torch.bfloat16)
    method, bits = fmt.split("-")
    quantize_model(model, QuantConfig(method=method, bits=int(bits)), progress=False)
    base = torch.randn(3, 1 + 512, device="cuda", dtype=torch.bfloat16)
    inputs = [base[:1, :512], base[1:2, 1:], base[2:3, :512].clone()]  # aligned, off by 2 bytes, fresh
    with torch.no_grad():
        monkeypatch.setattr(L, "FAST_LAUNCH", False)
        expected = [model(x) for x in inputs]
        monkeypatch.setattr(L, "FAST_LAUNCH", True)
        L.clear()
        for _ in range(3):  # the first call of each key fills the cache, the later ones launch directly
            got = [model(x) for x in inputs]
            for e, g in zip(expected, got):
                assert torch.equal(e, g)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_layer_on_another_gpu_than_the_current_one_computes_there():
    """A model split over GPUs (device_map="auto") calls layers on devices other than the current one:
    Triton launches on the current device, so the layer switches to its input's."""
    from quantune.config import QuantConfig
    from quantune.quantize import quantize_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 768, bias=False)).to(torch.bfloat16)
    quantize_model(model, QuantConfig(method="rtn", bits=4), progress=False)
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model.to("cuda:0")(x.to("cuda:0")).cpu()
        with torch.cuda.device(0):
            got = model.to("cuda:1")(x.to("cuda:1"))
    assert got.device == torch.device("cuda:1")
    assert torch.equal(got.cpu(), expected)

    from quantune import qlinear  # layers that read one input, launched together (q/k/v under compile_model)

    pair = torch.nn.Sequential(torch.nn.Linear(512, 256, bias=False), torch.nn.Linear(512, 128, bias=False))
    quantize_model(pair.to(torch.bfloat16), QuantConfig(method="rtn", bits=4), progress=False)

    def joined(device):
        layers = list(copy.deepcopy(pair).to(device))
        qlinear.colocate(layers)  # codes back to back on that device
        with torch.no_grad(), torch.cuda.device(0):
            return qlinear._joined_forward(layers, x.to(device))

    expected, got = joined("cuda:0"), joined("cuda:1")
    assert got is not None and len(got) == 2
    assert all(g.device == torch.device("cuda:1") and torch.equal(g.cpu(), e.cpu()) for g, e in zip(got, expected))
