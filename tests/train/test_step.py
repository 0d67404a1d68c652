"""The training step's reduction of loss terms: exactly the gradient of the whole batch, for any
set of terms and normalizers, with and without accumulation and data parallelism."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fdet.models.detectors.base import Term
from fdet.train.step import backward_terms

ROWS = 12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, 3, generator=g)
    y = torch.randn(ROWS, 2, generator=g)
    # rows that count for each normalizer; the last four rows count for neither "a" nor "c"
    mask_a = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    return x, y, mask_a


def _terms(model: nn.Module, x, y, mask_a, *, shared: bool) -> dict[str, Term]:
    """Three terms: "a" and "b" normalized by the masked rows (one shared count tensor when
    ``shared``, else two equal ones), "c" by every row."""
    out = model(x)  # [N, 2]
    err = (out - y).pow(2).sum(dim=1)  # [N]
    count_a = mask_a.sum(dtype=torch.float32)
    count_b = count_a if shared else mask_a.sum(dtype=torch.float32)
    return {
        "a": Term((err * mask_a).sum(), count_a, 1.0),
        "b": Term((out[:, 0].abs() * mask_a).sum(), count_b, 0.5),
        "c": Term(out[:, 1].pow(2).sum(), torch.tensor(float(len(x))), 2.0),
    }


def _reference_grads(shared: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The gradient of the whole batch's objective, computed in one piece."""
    model = _model()
    x, y, mask = _data()
    terms = _terms(model, x, y, mask, shared=shared)
    values = {n: t.weight * t.total / t.count.clamp(min=1) for n, t in terms.items()}
    torch.stack(list(values.values())).sum().backward()
    return [p.grad.clone() for p in model.parameters()], values


def _run(
    accumulate: int, shared: bool, model: nn.Module | None = None, rows: slice = slice(None)
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = model if model is not None else _model()
    x, y, mask = (t[rows] for t in _data())
    chunks = list(zip(x.chunk(accumulate), y.chunk(accumulate), mask.chunk(accumulate)))
    assert len(chunks) == accumulate

    def compute(i: int) -> dict[str, Term]:
        return _terms(model, *chunks[i], shared=shared)

    values = backward_terms(compute, accumulate=accumulate, model=model)
    return model, values


@pytest.mark.parametrize("shared", [True, False], ids=["shared-count", "separate-counts"])
@pytest.mark.parametrize("accumulate", [1, 2, 3, 4])
def test_accumulated_gradient_is_the_whole_batch_gradient(accumulate: int, shared: bool) -> None:
    expected, expected_values = _reference_grads(shared)
    model, values = _run(accumulate, shared)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    for name, value in expected_values.items():
        torch.testing.assert_close(values[name], value.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(values["loss"], sum(expected_values.values()).detach())
    # the micro-batches' own counts, not the per-micro-batch normalization of older libraries
    assert float(values["a_count"]) == 5 and float(values["c_count"]) == ROWS


def test_a_micro_batch_without_positives_is_not_a_division_by_zero() -> None:
    # micro-batch 3 of 3 has no row of mask "a": its terms add 0 with count 0
    _, values = _run(3, shared=False)
    assert all(torch.isfinite(v) for v in values.values())


def test_terms_must_match_across_micro_batches() -> None:
    model = _model()
    x, y, mask = _data()

    def compute(i: int) -> dict[str, Term]:
        terms = _terms(model, x[:6] if i == 0 else x[6:], y[:6], mask[:6], shared=True)
        return terms if i == 0 else {"a": terms["a"]}

    with pytest.raises(ValueError, match="returned terms"):
        backward_terms(compute, accumulate=2, model=model)


def test_a_loss_without_terms_is_an_error() -> None:
    with pytest.raises(ValueError, match="no terms"):
        backward_terms(lambda i: {}, accumulate=1, model=_model())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, accumulate: int, shared: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from fdet.train import distributed

        model = DistributedDataParallel(_model())
        rows = slice(0, 6) if rank == 0 else slice(6, 12)  # rank 1 has 1 row of mask "a", rank 0 4
        _, values = _run_ddp(model, accumulate, shared, rows, distributed)
        if rank == 0:
            torch.save({"grads": [p.grad for p in model.parameters()], "values": values}, out)
    finally:
        torch.distributed.destroy_process_group()


def _run_ddp(model, accumulate, shared, rows, distributed) -> tuple[nn.Module, dict]:
    x, y, mask = (t[rows] for t in _data())
    chunks = list(zip(x.chunk(accumulate), y.chunk(accumulate), mask.chunk(accumulate)))
    compute: Callable[[int], dict[str, Term]] = lambda i: _terms(  # noqa: E731
        model, *chunks[i], shared=shared
    )
    values = backward_terms(compute, accumulate=accumulate, model=model, world_size=2)
    return model, values


@pytest.mark.parametrize(("accumulate", "shared"), [(1, False), (3, False)], ids=["one", "three"])
def test_two_processes_give_the_whole_batch_gradient(tmp_path, accumulate, shared) -> None:
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.start_processes(
        _worker,
        args=(_free_port(), accumulate, shared, str(out)),
        nprocs=2,
        start_method="spawn",
    )
    got = torch.load(out, weights_only=True)
    expected, _ = _reference_grads(shared)
    for g, e in zip(got["grads"], expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


class _SlowBatches:
    """Batches that take ``delay`` seconds each to arrive."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __iter__(self) -> _SlowBatches:
        return self

    def __next__(self) -> object:
        import time
        from types import SimpleNamespace

        time.sleep(self.delay)
        x, y, mask = _data()
        images = torch.cat([x, y, mask[:, None].float()], dim=1)
        return SimpleNamespace(images=images, to=lambda *a, **k: SimpleNamespace(images=images))


@pytest.mark.parametrize(("delay", "accumulate"), [(0.0, 1), (0.05, 1), (0.05, 3)])
def test_the_step_reports_how_long_it_waited_for_data(delay: float, accumulate: int) -> None:
    from types import SimpleNamespace

    from fdet.train.step import DATA_WAIT, supervised_step

    model = _model()

    def loss_fn(outputs: torch.Tensor, batch: object) -> dict[str, Term]:
        x, y, mask = outputs[:, :3], outputs[:, 3:5], outputs[:, 5].bool()
        return _terms(model, x, y, mask, shared=True)

    exp = _experiment(accumulate)
    ctx = SimpleNamespace(
        exp=exp,
        precision="fp32",
        model=model,
        raw=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scaler=None,
        batches=_SlowBatches(delay),
        device=torch.device("cpu"),
        forward=lambda images: images,
        loss_fn=loss_fn,
        world_size=1,
    )
    step = supervised_step(ctx)  # type: ignore[arg-type]
    waits = [float(step()[DATA_WAIT]) for _ in range(2)]
    expected = delay * accumulate * 1e3  # every micro-batch waits
    assert all(wait >= expected for wait in waits)
    # each step reports its own wait, not a running total (which would be 2x on the second)
    assert all(wait < (1.9 * expected if expected else 50.0) for wait in waits)


def _experiment(accumulate: int) -> object:
    """An experiment whose step has ``accumulate`` micro-batches and no gradient clipping."""
    import attrs

    from fdet import specs

    base = specs.Experiment(
        model=specs.RetinaNet(head=specs.RetinaHead(num_classes=2)),
        data=specs.ShapesData(train_images=8, val_images=2, image_size=64),
    )
    return attrs.evolve(base, batch_size=accumulate * 4, accumulate=accumulate, grad_clip_norm=None)
