"""eval/a8_perplexity.py's input rounding: what the 8-bit dp4a probe's preparation computes, per chunk."""
import pytest
import torch

from eval.a8_perplexity import round_input, with_rounded_inputs


def test_integers_on_the_grid_come_back_unchanged():
    x = torch.tensor([[127.0, -3.0, 0.0, 64.0, -127.0, 1.0, 2.0, -5.0]])
    assert torch.equal(round_input(x, 4), x)  # each chunk's max is 127: the step is 1


def test_each_value_moves_at_most_half_its_chunk_s_step_and_halves_round_away_from_zero():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 64) * torch.tensor([1.0, 100.0, 1e-3, 7.0]).repeat_interleave(16)
    r = round_input(x, 16)
    step = x.unflatten(-1, (4, 16)).abs().amax(-1, keepdim=True) / 127
    assert ((r - x).unflatten(-1, (4, 16)).abs() <= step / 2 * (1 + 1e-6)).all()
    assert not torch.equal(r, x)
    half = torch.tensor([[127.0, 0.5, -0.5, 1.5]])
    assert torch.equal(round_input(half, 4), torch.tensor([[127.0, 1.0, -1.0, 2.0]]))


def test_a_width_that_is_not_whole_chunks_is_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        round_input(torch.zeros(1, 576), 256)


def test_the_hooked_copy_computes_on_rounded_inputs_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(2, 64)
    hooked = with_rounded_inputs(model, torch.nn.Linear, 8)
    first = model[0](round_input(x, 8)).relu()
    assert torch.allclose(hooked(x), model[2](round_input(first, 8)))
    assert torch.equal(model(x), model[2](model[0](x).relu()))  # the original has no hooks
