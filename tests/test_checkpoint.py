"""Training-state checkpoints: exact round trips, bitwise-exact resume, errors, atomic writes."""
from __future__ import annotations

import json
import random

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from quantune.checkpoint import (FORMAT_VERSION, METADATA_KEY, flatten_state, load_training_state,
                                 save_training_state, unflatten_state)
from quantune.config import QuantuneError


def _assert_same(a, b, path="root"):
    """Exact structural equality: same types (int vs float vs bool, tuple vs list), tensors bitwise."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b], f"{path}: keys"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def test_flatten_unflatten_round_trip_is_exact():
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
                  1: {"step": torch.tensor(7, dtype=torch.int64), "codes": torch.arange(5, dtype=torch.uint8)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "foreach": None,
                          "name": "lora", "params": [0, 1], "initial_lr": 1.0, "count": 2}],
        "mixed": [1, 1.0, True, None, "s", (1, (2.5, "x")), [], {}, float("inf"), float("nan")],
        "keys": {0: "int", "0": "str", (1, 2): "tuple", True: "bool", 2.5: "float", None: "none", "a.b": 1},
        "nested": {"a": {"b": torch.ones(1)}, "a.b": torch.zeros(1)},  # dotted-path collision
        "shared": [base[:6], base[3:9], base.view(3, 4), base],  # overlapping views of one storage
        "transposed": torch.randn(3, 4).t(),
        "empty": torch.empty(0, 3),
        "bf16": torch.randn(4).to(torch.bfloat16),
    }
    tensors, skeleton = flatten_state(state)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=True))  # must survive JSON
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    assert len(tensors) == 13
    # safetensors must accept the flat dict (it refuses shared storage) and give the same back
    back = unflatten_state(safetensors.torch.load(safetensors.torch.save(tensors)), skeleton)
    _assert_same(state, back)
    assert back["state"][0]["step"].dim() == 0 and back["state"][1]["codes"].dtype == torch.uint8
    with pytest.raises(TypeError, match="object"):
        flatten_state({"bad": object()})


def _train(model, opt, sched, batches):
    for x, y in batches:
        opt.zero_grad()
        noise = 0.01 * torch.randn_like(x)  # draws from the global RNG, so resume needs it restored
        loss = ((model(x + noise) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def _exact_resume(tmp_path, make_model, make_opt, n_in, n_out):
    """Run 6 steps saving at step 3; resume a fresh model/optimizer from the save and compare."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, n_in, generator=g), torch.randn(16, n_out, generator=g)) for _ in range(6)]
    make_sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # noqa: E731
    ckpt, params = tmp_path / "state.safetensors", tmp_path / "params.safetensors"

    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model)
    sched = make_sched(opt)
    _train(model, opt, sched, batches[:3])
    save_training_state(ckpt, optimizer=opt, scheduler=sched, step=3, extra={"seed": 1, "tokens": 768})
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, params)
    rng = torch.get_rng_state()
    r_ref, py_ref = torch.rand(3), random.random()
    torch.set_rng_state(rng)
    _train(model, opt, sched, batches[3:])

    torch.manual_seed(123)  # a different RNG stream and a different init: both must be restored
    model2 = make_model()
    model2.load_state_dict(safetensors.torch.load_file(params))
    opt2 = make_opt(model2)
    sched2 = make_sched(opt2)
    info = load_training_state(ckpt, optimizer=opt2, scheduler=sched2)
    assert info == {"step": 3, "extra": {"seed": 1, "tokens": 768}}
    rng = torch.get_rng_state()
    assert torch.equal(torch.rand(3), r_ref) and random.random() == py_ref
    torch.set_rng_state(rng)
    assert type(opt2.param_groups[0]["betas"]) is tuple
    _train(model2, opt2, sched2, batches[3:])
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), f"{name} differs after resume"
    return opt2


def test_exact_resume_adamw(tmp_path):
    _exact_resume(tmp_path, lambda: nn.Linear(8, 4),
                  lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), 8, 4)


def test_exact_resume_bitsandbytes_adamw8bit(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    try:
        probe = nn.Linear(128, 64)
        probe_opt = bnb.optim.AdamW8bit(probe.parameters(), lr=1e-3)
        probe(torch.randn(2, 128)).sum().backward()
        probe_opt.step()
    except Exception as exc:  # noqa: BLE001  (no usable bnb backend on this machine)
        pytest.skip(f"bitsandbytes AdamW8bit cannot step on CPU here: {type(exc).__name__}: {exc}")
    # two layers with >= 4096 weights: both get 8-bit state, which shares bnb's quantile maps
    make_model = lambda: nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128))  # noqa: E731
    opt2 = _exact_resume(tmp_path, make_model, lambda m: bnb.optim.AdamW8bit(m.parameters(), lr=1e-2), 128, 128)
    tensors, _ = flatten_state(opt2.state_dict())
    assert any(k.endswith("state1") and t.dtype == torch.uint8 for k, t in tensors.items()), "no 8-bit state"


def test_grad_scaler_round_trip(tmp_path):
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"GradScaler('cpu') not constructible: {exc}")
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):  # scale doubles after 3 clean steps, tracker ends at 1
        opt.zero_grad()
        scaler.scale(model(torch.randn(2, 8)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] == 2048.0 and saved["_growth_tracker"] == 1
    save_training_state(tmp_path / "s.safetensors", optimizer=opt, scaler=scaler, step=4)
    fresh = torch.amp.GradScaler("cpu")
    load_training_state(tmp_path / "s.safetensors", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        scaler=fresh)
    _assert_same(fresh.state_dict(), saved)
    assert fresh.get_scale() == 2048.0


def _saved(tmp_path):
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    path = tmp_path / "state.safetensors"
    save_training_state(path, optimizer=opt, step=1)
    return path, model


def test_load_errors(tmp_path):
    path, model = _saved(tmp_path)
    new_opt = lambda: torch.optim.AdamW(model.parameters())  # noqa: E731
    with pytest.raises(QuantuneError, match="not found"):
        load_training_state(tmp_path / "missing.safetensors", optimizer=new_opt())
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, plain, metadata={"format": "pt"})
    with pytest.raises(QuantuneError, match="not a quantune training state"):
        load_training_state(plain, optimizer=new_opt())
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(QuantuneError, match="not a readable safetensors file"):
        load_training_state(tmp_path / "junk.safetensors", optimizer=new_opt())
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    future = tmp_path / "future.safetensors"
    safetensors.torch.save_file(tensors, future, metadata={**meta, "format_version": "99"})
    with pytest.raises(QuantuneError, match="format version '99'"):
        load_training_state(future, optimizer=new_opt())
    mismatch = r"different set of trainable parameters \(params per group: saved \[2\], now \[1\]\)"
    with pytest.raises(QuantuneError, match=mismatch):
        load_training_state(path, optimizer=torch.optim.AdamW([model.weight]))
    with pytest.raises(QuantuneError, match="different set of trainable parameters"):
        load_training_state(path, optimizer=torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}]))
    with pytest.raises(QuantuneError, match="no lr scheduler state"):
        opt = new_opt()
        load_training_state(path, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert load_training_state(path, optimizer=new_opt()) == {"step": 1, "extra": {}}


def test_file_is_safetensors_and_write_is_atomic(tmp_path, monkeypatch):
    path, model = _saved(tmp_path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format_version"] == FORMAT_VERSION == "1"
    assert json.loads(meta[METADATA_KEY])["step"] == 1
    assert {"rng.torch", "optimizer.state.0.exp_avg", "optimizer.state.1.step"} <= keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]
    good = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(OSError, match="disk full"):
        save_training_state(path, optimizer=opt, step=2)
    assert path.read_bytes() == good  # the previous state is untouched
    new = tmp_path / "new.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_training_state(new, optimizer=opt, step=2)
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]  # no temp file left
