"""Muon: Newton-Schulz on rectangular matrices, MuonEq-R, the shape scale, and 2 gloo ranks == 1 process."""

from __future__ import annotations

import contextlib
import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_MODEL

import train_gpt
from train_gpt import GPT, Config, Muon, Optimizers, muon_update, train_step, zeropower_via_newtonschulz5

TINY = TINY_MODEL


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- Newton-Schulz ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 256)])
def test_newton_schulz_singular_values_on_rectangular(shape: tuple[int, int]) -> None:
    # square Gaussian matrices have sigma_min ~ 0, so only rectangular ones have a meaningful lower bound
    G = rand(*shape)
    X = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    assert 0.6 < s.min() and s.max() < 1.2, (s.min(), s.max())  # quintic NS: S' ~ U(0.5, 1.5); 0.68-1.13 observed
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm())  # close to the polar factor U V^T
    assert cos > 0.97, cos


def test_newton_schulz_is_scale_invariant_and_deterministic() -> None:
    G = rand(64, 128)
    X = zeropower_via_newtonschulz5(G, 5)
    torch.testing.assert_close(zeropower_via_newtonschulz5(1000.0 * G, 5), X, rtol=1e-4, atol=1e-5)
    assert torch.equal(zeropower_via_newtonschulz5(G, 5), X)


def reference_muon_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float, row_normalize: bool) -> torch.Tensor:
    """Record P's Muon direction (momentum, row norm, NS, shape scale), written out independently."""
    buf.mul_(momentum).add_(grad)
    u = grad + momentum * buf  # Nesterov
    if row_normalize:
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-7)
    rows, cols = grad.shape
    return zeropower_via_newtonschulz5(u, 5) * max(1.0, rows / cols) ** 0.5


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (256, 64)])
@pytest.mark.parametrize("row_normalize", [True, False])
def test_muon_update_matches_reference_and_shape_scale(shape: tuple[int, int], row_normalize: bool) -> None:
    grad, buf0 = rand(*shape, seed=1), rand(*shape, seed=2)
    buf, ref_buf = buf0.clone(), buf0.clone()
    u = muon_update(grad, buf, 0.95, 5, row_normalize)
    torch.testing.assert_close(u, reference_muon_update(grad, ref_buf, 0.95, row_normalize), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf, 0.95 * buf0 + grad)  # momentum buffer updated in place
    # the shape scale: spectral norm ~ sqrt(max(1, rows/cols)) (NS singular values are within [0.6, 1.2])
    top = torch.linalg.matrix_norm(u, ord=2) / max(1.0, shape[0] / shape[1]) ** 0.5
    assert 0.6 < top < 1.2, top


def test_muon_eq_r_is_invariant_to_row_rescaling() -> None:
    grad = rand(64, 128, seed=3)
    scales = torch.exp(2 * rand(64, 1, seed=4))  # per-row factors across ~e^-6 .. e^6
    base = muon_update(grad, torch.zeros_like(grad), 0.95, 5, row_normalize=True)
    scaled = muon_update(scales * grad, torch.zeros_like(grad), 0.95, 5, row_normalize=True)
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-5)
    plain = muon_update(grad, torch.zeros_like(grad), 0.95, 5, row_normalize=False)
    plain_scaled = muon_update(scales * grad, torch.zeros_like(grad), 0.95, 5, row_normalize=False)
    assert (plain_scaled - plain).abs().max() > 0.1  # without MuonEq-R the row scales do leak through


def test_muon_step_applies_decoupled_wd_then_update() -> None:
    w0, grad = rand(64, 128, seed=5), rand(64, 128, seed=6)
    p = torch.nn.Parameter(w0.clone())
    p.grad = grad.clone()
    opt = Muon([p], lr=0.1, momentum=0.9, ns_steps=5, weight_decay=0.5, row_normalize=True)
    opt.step()
    expected = w0 * (1 - 0.1 * 0.5) - 0.1 * reference_muon_update(grad, torch.zeros_like(grad), 0.9, True)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], grad)


# --- 2 gloo ranks == 1 process ---------------------------------------------------------------------------------------

STEPS, MICRO_PER_RANK, SEQS_PER_MICRO, SEQ_LEN = 5, 2, 2, 32
LOOP_FROM_STEP = 3  # the last steps run looped, so both graphs of the model are covered


def global_batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, the global batch as 2 * MICRO_PER_RANK micro-batches; rank r owns micro-batches of its half."""
    g = torch.Generator().manual_seed(1234)
    steps = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 512, (2 * MICRO_PER_RANK, SEQS_PER_MICRO, SEQ_LEN + 1), generator=g)
        steps.append([(t[:, :-1], t[:, 1:]) for t in tokens])
    return steps


def run_steps(train_model: torch.nn.Module, model: GPT, opts: Optimizers, micro: list[list[tuple]]) -> list[float]:
    losses = []
    for step, batches in enumerate(micro):
        model.looping = step >= LOOP_FROM_STEP
        loss = train_step(train_model, opts, batches, 0.3, contextlib.nullcontext)
        losses.append(train_gpt.all_reduce_(loss.detach().clone(), dist.ReduceOp.AVG).item())
    return losses


def _rank_worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = GPT(Config(**TINY))
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None, forward_sync_buffers=False)  # as run()
        opts = Optimizers(model, Config(**TINY), rank=rank, world_size=2)
        mine = [b[rank * MICRO_PER_RANK : (rank + 1) * MICRO_PER_RANK] for b in global_batches()]
        losses = run_steps(ddp, model, opts, mine)
        owned = [i for i, p in enumerate(opts.muon.param_groups[0]["params"]) if "momentum_buffer" in opts.muon.state[p]]
        torch.save(dict(losses=losses, params={k: v.detach() for k, v in model.named_parameters()}, owned=owned),
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_muon_step_allocates_nothing_after_the_first() -> None:
    """Record P allocates its exchange buffer once; ours did a zeros() and a zeros_like() per step. After the first
    step (which creates the momentum buffers), a step calls no tensor factory and reuses the same buffers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    factories = {torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.empty_like.default,
                 torch.ops.aten.full.default, torch.ops.aten.new_zeros.default}
    params = [torch.nn.Parameter(rand(32, 64, seed=i)) for i in range(3)]
    opt = Muon(params, lr=0.02, momentum=0.95, ns_steps=5, weight_decay=0.0, row_normalize=True)

    class Factories(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if func in factories:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for p in params:
        p.grad = rand(32, 64, seed=7)
    opt.step()
    buffers = [opt.state[p]["momentum_buffer"] for p in params]
    flat = opt.flat[0].data_ptr()
    with Factories() as spy:
        opt.step()
    assert spy.seen == []
    assert [opt.state[p]["momentum_buffer"] for p in params] == buffers and opt.flat[0].data_ptr() == flat


def test_adamw_is_the_fused_kernel() -> None:
    """Record P uses fused AdamW for the embedding and the scalars; torch has a fused kernel on CPU too."""
    opts = Optimizers(GPT(Config(**TINY)), Config(**TINY))
    assert opts.embed.defaults["fused"] is True and opts.scalar.defaults["fused"] is True


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    ctx = mp.start_processes(_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("2-rank gloo run did not finish within 180 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT(Config(**TINY))
        opts = Optimizers(model, Config(**TINY))
        losses = run_steps(model, model, opts, global_batches())  # all 4 micro-batches as grad accumulation
    finally:
        torch.set_num_threads(threads)
    n_muon = len(opts.muon.param_groups[0]["params"])
    assert all("momentum_buffer" in opts.muon.state[p] for p in opts.muon.param_groups[0]["params"])

    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(losses), rtol=1e-4, atol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(out["params"][name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
        assert out["owned"] == [i for i in range(n_muon) if i % 2 == rank]  # Muon sharded its momentum buffers
    torch.manual_seed(0)
    init = GPT(Config(**TINY))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), init.parameters()))  # every tensor trained
