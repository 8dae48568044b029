"""train_gpt model: parameter count and roles, layer schedule, XSA, partial RoPE, and fullgraph compile."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY_MODEL

import train_gpt
from train_gpt import GPT, Config, apply_partial_rope, layer_schedule, param_roles, rope_tables, xsa

TINY = TINY_MODEL


def tiny_model(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config(**{**TINY, **overrides}))


# --- parameter count and roles --------------------------------------------------------------------------------------

def test_default_config_has_record_p_param_count() -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(Config())
    assert sum(p.numel() for p in model.parameters()) == 35_944_536  # record P's log: model_params:35944536


def test_param_roles_snapshot() -> None:
    model = tiny_model()
    per_block = {  # the 6 block matrices are Muon's; every gain, scale and mix is a scalar
        "attn.c_q.weight": "muon", "attn.c_k.weight": "muon", "attn.c_v.weight": "muon", "attn.proj.weight": "muon",
        "mlp.fc.weight": "muon", "mlp.proj.weight": "muon",
        "attn.q_gain": "scalar", "attn_scale": "scalar", "mlp_scale": "scalar", "resid_mix": "scalar",
    }
    expected = {"tok_emb.weight": "embed", "skip_weights": "scalar", "skip_gates": "scalar"}
    expected |= {f"blocks.{i}.{k}": role for i in range(4) for k, role in per_block.items()}
    roles = param_roles(model)
    assert roles == expected
    assert list(roles) == [n for n, _ in model.named_parameters()]  # every parameter, in registration order
    assert sum(role == "muon" for role in roles.values()) == 6 * 4


def test_optimizers_partition_params_by_role() -> None:
    model = tiny_model()
    opts = train_gpt.Optimizers(model, Config(**TINY))
    names = {id(p): n for n, p in model.named_parameters()}
    roles = param_roles(model)
    for opt, role in zip(opts.all, ("muon", "embed", "scalar")):
        members = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        assert sorted(members) == sorted(n for n, r in roles.items() if r == role)


def test_xsa_flag_follows_xsa_last_n() -> None:
    model = tiny_model(xsa_last_n=2)
    assert [b.attn.use_xsa for b in model.blocks] == [False, False, True, True]
    assert [b.parallel for b in model.blocks] == [False, False, False, True]  # PARALLEL_RESIDUAL_START=3


# --- layer schedule -------------------------------------------------------------------------------------------------

def test_layer_schedule_record_p() -> None:
    assert layer_schedule(11, 3, 5, 2, looping=True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert layer_schedule(11, 3, 5, 2, looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert layer_schedule(11, 3, 5, 0, looping=True) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])  # num_loops=0
    assert layer_schedule(9, 0, 0, 0, looping=False) == ([0, 1, 2, 3], [4, 5, 6, 7, 8])  # the 9-layer baseline


@pytest.mark.parametrize("num_layers", [1, 2, 5, 11])
def test_layer_schedule_properties(num_layers: int) -> None:
    for start, end in itertools.combinations_with_replacement(range(num_layers), 2):
        for num_loops in range(4):
            enc, dec = layer_schedule(num_layers, start, end, num_loops, looping=True)
            seq = enc + dec
            assert len(enc) == len(seq) // 2
            assert sorted(set(seq)) == list(range(num_layers))  # every layer runs
            span = list(range(start, end + 1))
            assert seq == list(range(start)) + span * (num_loops + 1) + list(range(end + 1, num_layers))
            for i in range(num_layers):
                assert seq.count(i) == (num_loops + 1 if start <= i <= end else 1)


def test_skip_count_sized_from_looped_lists() -> None:
    # the record: 8 skip rows (min of 8 encoder / 9 decoder entries when looped), also used unlooped
    with torch.device("meta"):
        model = GPT(Config())
    assert model.num_skips == 8 and tuple(model.skip_weights.shape) == (8, 512)
    assert model.skip_gates is not None and tuple(model.skip_gates.shape) == (8, 512)


def test_looping_changes_forward_only_when_on() -> None:
    model = tiny_model()
    # nonzero output projections, so every block changes the residual stream
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        off1, off2 = model.forward_logits(ids), model.forward_logits(ids)
        model.looping = True
        on = model.forward_logits(ids)
    assert torch.equal(off1, off2)
    assert not torch.allclose(off1, on, atol=1e-4)


# --- XSA and partial RoPE -------------------------------------------------------------------------------------------

def test_xsa_removes_own_value_direction_per_kv_group() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D = 2, 5, 8, 2, 16
    y, v = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g)
    out = xsa(y, v)
    v_hat = v / v.norm(dim=-1, keepdim=True)
    for h in range(H):
        grp = h // (H // Hkv)  # heads 0-3 read KV group 0, heads 4-7 group 1
        dot = (out[:, :, h] * v_hat[:, :, grp]).sum(-1)
        assert dot.abs().max() < 1e-5, (h, dot.abs().max())
        other = (out[:, :, h] * v_hat[:, :, 1 - grp]).sum(-1)
        assert other.abs().max() > 1e-2  # not orthogonal to the other group's value: the grouping matters
        removed = y[:, :, h] - out[:, :, h]  # only the component along v_hat was removed
        expected = (y[:, :, h] * v_hat[:, :, grp]).sum(-1, keepdim=True) * v_hat[:, :, grp]
        torch.testing.assert_close(removed, expected, rtol=1e-5, atol=1e-6)


def test_partial_rope_rotates_only_first_dims_and_keeps_norms() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, H, D, R = 2, 12, 4, 16, 8
    x = torch.randn(B, T, H, D, generator=g)
    cos, sin = rope_tables(T, R, 10000.0)
    assert cos.shape == (T, R // 2)
    out = apply_partial_rope(x, cos, sin)
    assert torch.equal(out[..., R:], x[..., R:])  # dims R..D-1 untouched, bit for bit
    torch.testing.assert_close(out[..., :R].norm(dim=-1), x[..., :R].norm(dim=-1))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0 is the identity
    assert not torch.allclose(out[:, 1:, :, :R], x[:, 1:, :, :R], atol=1e-3)  # later positions really rotate


def test_partial_rope_dot_products_depend_on_relative_position() -> None:
    g = torch.Generator().manual_seed(1)
    T, D, R = 16, 16, 8
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    cos, sin = rope_tables(T, R, 10000.0)
    qs = apply_partial_rope(q.expand(1, T, 1, D), cos, sin)[0, :, 0]  # the same q at every position
    ks = apply_partial_rope(k.expand(1, T, 1, D), cos, sin)[0, :, 0]
    dots = qs @ ks.T  # dots[m, n] = <R_m q, R_n k>
    for m, n in itertools.product(range(T - 1), repeat=2):
        torch.testing.assert_close(dots[m + 1, n + 1], dots[m, n], rtol=1e-5, atol=1e-5)
    assert (dots[0, 1] - dots[0, 5]).abs() > 1e-3  # and it does depend on the difference


# --- torch.compile ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fullgraph_compile_has_no_graph_breaks() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    # aot_eager: dynamo must capture the forward in one graph (fullgraph=True raises on a break) and AOTAutograd
    # must trace its backward, as inductor would, without paying inductor's ~30 s cold C++ compile on CPU
    torch._dynamo.reset()
    # 3 layers: a plain block, a looped one, a parallel-residual one; tracing time grows with the block passes
    model = tiny_model(num_layers=3, loop_start=1, loop_end=1, parallel_residual_start=2, xsa_last_n=3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=counter)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    for looping in (False, True):
        model.looping = looping  # a guard on this flag: one graph per mode, as in training
        loss = compiled(ids, ids)  # raises torch._dynamo.exc.Unsupported on any graph break
        loss.backward()
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, model(ids, ids), rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
    assert counter.frame_count == 2  # exactly one graph per looping mode, no recompiles
    torch._dynamo.reset()
