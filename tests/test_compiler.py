"""quantune.compiler: the inductor pass that lets layers reading one tensor share its preparation,
and compile_model. On the CPU the layers compute through their decoded weights, so the pass is
checked for what it rewrites and that the rewritten graph computes the same numbers."""
import pytest
import torch
from torch import nn

from quantune.compiler import SHARE_INPUTS, compile_model
from quantune.config import QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear


def _quant(i: int, o: int, seed: int, bias: bool = False, cfg=QuantConfig(method="rtn", bits=4, group_size=16)):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(i, o, bias=bias), cfg)[0]


class Attention(nn.Module):
    """q/k/v read one normed tensor; o reads another."""

    def __init__(self, cfg=QuantConfig(method="rtn", bits=4, group_size=16)):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = _quant(32, 32, 1, cfg=cfg), _quant(32, 16, 2, bias=True, cfg=cfg), _quant(32, 16, 3, cfg=cfg)
        self.o = _quant(32, 32, 4, cfg=cfg)

    def forward(self, x):
        h = self.norm(x)
        a = self.q(h) * 2 + torch.cat([self.k(h), self.v(h)], -1)
        return x + self.o(torch.relu(a))


@pytest.mark.parametrize("cfg", [QuantConfig(method="rtn", bits=4, group_size=16), QuantConfig(method="kashin", bits=3)],
                         ids=["rtn", "kashin"])
def test_layers_reading_one_tensor_become_one_shared_op(cfg):
    model = Attention(cfg).eval()
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    SHARE_INPUTS.groups = 0
    # no compiled-graph cache: a graph loaded from an earlier run would skip the pass (and its count)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        eager = model(x)
        separate = compile_model(model, share_inputs=False, fullgraph=True)(x)
        assert SHARE_INPUTS.groups == 0
        torch._dynamo.reset()
        shared = compile_model(model, fullgraph=True)(x)
    assert SHARE_INPUTS.groups == 1  # q/k/v merged; o alone stays a single-layer op
    torch.testing.assert_close(shared, separate, rtol=0, atol=0)
    torch.testing.assert_close(shared, eager, rtol=1e-5, atol=1e-5)  # inductor's LayerNorm rounds its own way


def test_shared_op_equals_each_layer_alone():
    layers = [_quant(32, 8, 5), _quant(32, 24, 6, bias=True)]
    x = torch.randn(4, 32)
    with torch.no_grad():
        outs = torch.ops.quantune.linear_shared(x, [m.codes for m in layers], [m.bias for m in layers],
                                                [m._handle for m in layers], [m.out_features for m in layers])
        for got, m in zip(outs, layers):
            torch.testing.assert_close(got, m(x), rtol=0, atol=0)
    with pytest.raises(QuantuneError, match="no quantized layer behind handle"):
        torch.ops.quantune.linear_shared(x, [layers[1].codes], [None], [layers[0]._handle], [8])


def test_compile_model_takes_a_mode_as_options():
    model = Attention().eval()
    x = torch.randn(1, 2, 32)
    with torch.no_grad():
        got = compile_model(model, mode="default", fullgraph=True)(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
