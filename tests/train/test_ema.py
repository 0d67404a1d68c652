"""EMA of weights: hand-computed updates, the warm-up, buffers, swapping in and checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fdet.train.ema import (
    EmaState,
    ema_decay,
    ema_init,
    ema_load_state_dict,
    ema_model_state_dict,
    ema_state_dict,
    ema_update,
    ema_update_,
    swapped_in,
)


def _two_parameter_model(w: float, b: float) -> nn.Linear:
    model = nn.Linear(1, 1)
    _set(model, w, b)
    return model


def _set(model: nn.Linear, w: float, b: float) -> None:
    with torch.no_grad():
        model.weight.fill_(w)
        model.bias.fill_(b)


def _values(state: EmaState) -> tuple[float, float]:
    return state.params["weight"].item(), state.params["bias"].item()


def _averaged(state: EmaState, name: str) -> torch.Tensor:
    return state.params[name] if name in state.params else state.buffers[name]


def _first_linear(model: nn.Sequential) -> nn.Linear:
    layer = model[0]
    assert isinstance(layer, nn.Linear)
    return layer


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


@pytest.mark.parametrize("in_place", [False, True])
def test_two_updates_by_hand(in_place: bool) -> None:
    model = _two_parameter_model(1.0, 2.0)
    state = ema_init(model)
    update = ema_update_ if in_place else ema_update
    _set(model, 3.0, 6.0)
    new = update(state, model, decay=0.75, warmup_updates=0)
    assert (new is state) == in_place  # in place: the caller may ignore the result
    state = new
    assert _values(state) == (0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6)  # (1.5, 3.0)
    _set(model, 5.0, 0.0)
    state = update(state, model, decay=0.75, warmup_updates=0)
    assert _values(state) == (0.75 * 1.5 + 0.25 * 5, 0.75 * 3.0 + 0.25 * 0)  # (2.375, 2.25)
    assert int(state.updates) == 2
    assert state.updates.dtype == torch.int64 and state.updates.device.type == "cpu"


def test_pure_update_leaves_the_old_state_alone() -> None:
    model = _two_parameter_model(1.0, 2.0)
    before = ema_init(model)
    _set(model, 3.0, 6.0)
    after = ema_update(before, model, decay=0.5, warmup_updates=0)
    assert _values(before) == (1.0, 2.0) and int(before.updates) == 0
    assert _values(after) == (2.0, 4.0) and int(after.updates) == 1
    assert after.params["weight"] is not model.weight


def test_warmup_formula() -> None:
    assert ema_decay(0.9, 0, 0) == 0.9
    assert ema_decay(0.9, 0, 7) == 0.9
    assert ema_decay(0.9998, 2000, 0) == 0.0
    assert ema_decay(0.9998, 2000, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1)), rel=1e-12)
    assert ema_decay(0.5, 10, 10_000) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ema_decay(1.5, 0, 1)
    with pytest.raises(ValueError):
        ema_decay(0.9, -1, 1)
    # The n-th update uses the decay for n: first update with warmup_updates=1.
    model = _two_parameter_model(0.0, 0.0)
    state = ema_init(model)
    _set(model, 1.0, -1.0)
    state = ema_update(state, model, decay=0.5, warmup_updates=1)
    d = 0.5 * (1 - math.exp(-1))
    w, b = _values(state)
    assert w == pytest.approx(1 - d, rel=1e-6) and b == pytest.approx(-(1 - d), rel=1e-6)


@pytest.mark.parametrize("in_place", [False, True])
def test_float_buffers_averaged_integer_buffers_copied(in_place: bool) -> None:
    model = _bn_model()
    state = ema_init(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(8, 3))
    model(torch.randn(8, 3))
    now = model.state_dict()
    update = ema_update_ if in_place else ema_update
    state = update(state, model, decay=0.5, warmup_updates=0)
    for k in ("1.running_mean", "1.running_var"):
        assert not torch.equal(now[k], before[k])
        want = 0.5 * before[k] + 0.5 * now[k]
        torch.testing.assert_close(state.buffers[k], want, rtol=0, atol=1e-7)
    tracked = state.buffers["1.num_batches_tracked"]
    assert tracked.dtype == torch.int64 and tracked.item() == 2


def test_in_place_equals_pure() -> None:
    model = _bn_model()
    pure, fused = ema_init(model), ema_init(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        pure = ema_update(pure, model, decay=0.9, warmup_updates=3)
        fused = ema_update_(fused, model, decay=0.9, warmup_updates=3)
    assert int(pure.updates) == int(fused.updates) == 4
    for a, b in ((pure.params, fused.params), (pure.buffers, fused.buffers)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_ema_of_a_constant_model_is_that_model() -> None:
    model = _bn_model()
    state = ema_init(model)
    for _ in range(5):
        state = ema_update(state, model, decay=0.9, warmup_updates=3)
    for k, v in model.state_dict().items():
        assert torch.equal(_averaged(state, k), v), k


def test_swapped_in_loads_ema_and_restores_bit_identically_on_error() -> None:
    model = _bn_model()
    state = ema_init(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        state = ema_update(state, model, decay=0.7, warmup_updates=0)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    ema_saved = {k: v.clone() for k, v in {**state.params, **state.buffers}.items()}
    assert not torch.equal(raw["0.weight"], state.params["0.weight"])

    with pytest.raises(RuntimeError, match="boom"), swapped_in(model, state) as inside:
        assert inside is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema_saved[k]), k
        model(torch.randn(8, 3))  # train mode: changes the model's running stats
        raise RuntimeError("boom")

    for k, v in model.state_dict(keep_vars=True).items():
        assert v is tensors[k], k  # the same tensors (optimizer references stay valid)
        assert torch.equal(v, raw[k]), k
    for k, v in {**state.params, **state.buffers}.items():
        assert torch.equal(v, ema_saved[k]), k  # the block's BN update did not reach the EMA


def test_names_of_compiled_model_and_mismatch_errors() -> None:
    model = _bn_model()
    compiled = torch.compile(model)  # lazy wrapper: nothing compiles here
    assert isinstance(compiled, nn.Module)
    state = ema_init(compiled)
    assert set(state.params) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"missing \[\].*unexpected \['1.bias'"):
        ema_update(state, other, decay=0.9, warmup_updates=0)
    with pytest.raises(ValueError, match="does not match"), swapped_in(other, state):
        pass


def test_state_dict_round_trip_through_torch_save(tmp_path: object) -> None:
    model = _bn_model()
    state = ema_init(model)
    model.train()
    model(torch.randn(8, 3))
    with torch.no_grad():
        _first_linear(model).weight.add_(1.0)
    state = ema_update(state, model, decay=0.9, warmup_updates=10)
    buf = io.BytesIO()
    torch.save({"ema": ema_state_dict(state)}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["ema"]
    for restored in (ema_load_state_dict(loaded), ema_load_state_dict(loaded, model)):
        assert int(restored.updates) == int(state.updates) == 1
        for a, b in ((restored.params, state.params), (restored.buffers, state.buffers)):
            assert list(a) == list(b)
            assert all(torch.equal(a[k], b[k]) for k in a)
    # Training resumes identically from the restored state.
    again = ema_update(ema_load_state_dict(loaded, model), model, decay=0.9, warmup_updates=10)
    cont = ema_update(state, model, decay=0.9, warmup_updates=10)
    assert all(torch.equal(again.params[k], cont.params[k]) for k in cont.params)

    on_cpu = ema_load_state_dict(loaded, device="cpu")
    assert all(v.device.type == "cpu" for v in on_cpu.params.values())
    with pytest.raises(ValueError, match="not an EMA state dict"):
        ema_load_state_dict({"params": {}})
    bad = dict(loaded, params={**loaded["params"], "0.weight": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"0.weight is \(5,\)"):
        ema_load_state_dict(bad, model)


def test_ema_model_state_dict_makes_a_plain_ema_model() -> None:
    model = _bn_model()
    state = ema_init(model)
    with torch.no_grad():
        _first_linear(model).bias.add_(2.0)
    state = ema_update(state, model, decay=0.5, warmup_updates=0)
    fresh = _bn_model()
    fresh.load_state_dict(ema_model_state_dict(model, state))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, _averaged(state, k)), k
