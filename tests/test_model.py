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

def test_default_config_has_record_n_param_count() -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(Config())
    assert sum(p.numel() for p in model.parameters()) == 35_945_671  # record N's log: model_params:35945671


def test_param_roles_snapshot() -> None:
    model = tiny_model()
    per_block = {  # the 6 block matrices are Muon's; every gain, scale and mix is a scalar
        "attn.c_q.weight": "muon", "attn.c_k.weight": "muon", "attn.c_v.weight": "muon", "attn.proj.weight": "muon",
        "mlp.fc.weight": "muon", "mlp.proj.weight": "muon",
        "attn.q_gain": "scalar", "attn_scale": "scalar", "mlp_scale": "scalar", "resid_mix": "scalar",
    }
    per_block["attn.attn_gate_w"] = "scalar"
    expected = {"tok_emb.weight": "embed", "skip_weights": "scalar", "skip_gates": "scalar", "smear_gate": "scalar",
                "smear_lambda": "scalar", "parallel_resid_lambdas": "scalar", "parallel_post_lambdas": "scalar"}
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


# --- record N's model features: SmearGate, sparse attention gate, two lanes, document isolation ---------------------

def randomized(model: GPT, seed: int = 1, std: float = 0.3) -> GPT:
    """Every parameter random (zero-init gates and projections would hide the features under test)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    model.looping = True
    return model.eval()


def docs_ids(T: int = 96, bos: tuple[int, ...] = (0, 30, 61), rows: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY["vocab_size"], (rows, T), generator=g)
    ids[:, list(bos)] = train_gpt.BOS_ID
    return ids


def test_smear_gate_is_identity_at_init_and_never_crosses_a_bos() -> None:
    x, ids = torch.randn(2, 16, 32), docs_ids(16, (0, 7))
    assert torch.equal(train_gpt.smear(x, ids, torch.zeros(1, 12), torch.zeros(1)), x)
    y = train_gpt.smear(x, ids, torch.randn(1, 12), torch.ones(1))
    assert torch.equal(y[:, [0, 7]], x[:, [0, 7]])  # position 0 and the BOS: untouched
    assert not torch.allclose(y[:, 8], x[:, 8])  # elsewhere the previous token is smeared in
    # the model: the last token of document 1 changes nothing at document 2's BOS, nor after it
    model = randomized(tiny_model())
    ids = docs_ids()
    other = ids.clone()
    other[:, 60] = torch.where(ids[:, 60] == 2, 3, 2)
    diff = (model.forward_logits(ids) - model.forward_logits(other)).abs().amax(-1)
    assert diff[:, 60].min() > 0 and diff[:, 61:].max() == 0


def test_sparse_attention_gate_scales_every_forward() -> None:
    """At init the gate is sigmoid(0) = 1/2 on every head: the gated model equals the ungated one with its attention
    output projections halved, in the logits and in the training loss (the gate sits in the one attention path every
    forward takes); learned gate weights then make it input-dependent."""
    gated = randomized(tiny_model())
    plain = tiny_model(sparse_attn_gate_enabled=False)
    with torch.no_grad():
        for b in gated.blocks:
            b.attn.attn_gate_w.zero_()
    plain.load_state_dict({k: v * 0.5 if k.endswith("attn.proj.weight") else v
                           for k, v in gated.state_dict().items() if "attn_gate_w" not in k})
    plain.looping = True
    ids = docs_ids()
    torch.testing.assert_close(gated.forward_logits(ids), plain.eval().forward_logits(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated(ids, ids), plain(ids, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(randomized(tiny_model()).forward_logits(ids), plain.forward_logits(ids), atol=1e-3)
    assert all(not hasattr(b.attn, "attn_gate_w") for b in plain.blocks)


def test_two_lanes_with_tied_lambdas_equal_one_lane() -> None:
    """With rho = pi = 1, x0 not mixed in and no skip into them, both lanes carry the same stream, and the two-lane
    block is P's one-lane parallel block; record N's lambdas (rho 1.1) make it a different model."""
    two = randomized(tiny_model(num_layers=5, xsa_last_n=5))  # two-lane layers 3 and 4
    one = tiny_model(num_layers=5, xsa_last_n=5, parallel_lanes=1)
    with torch.no_grad():
        for b in two.blocks[3:]:
            b.resid_mix.copy_(torch.stack((torch.ones(TINY["model_dim"]), torch.zeros(TINY["model_dim"]))))
        two.parallel_resid_lambdas.fill_(1.0)
        two.parallel_post_lambdas.fill_(1.0)
        two.skip_gates[2:].fill_(100.0)  # no skip into the two-lane layers (it would join lane 0 only)
    one.load_state_dict({k: v for k, v in two.state_dict().items() if not k.startswith("parallel_")})
    one.looping = True
    ids = docs_ids()
    torch.testing.assert_close(two.forward_logits(ids), one.eval().forward_logits(ids), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        two.parallel_resid_lambdas.fill_(1.1)
    assert not torch.allclose(two.forward_logits(ids), one.forward_logits(ids), atol=1e-3)
    assert two.parallel_resid_lambdas.shape == (5, 2) and two.parallel_post_lambdas.shape == (5, 2, 2)
    with pytest.raises(ValueError, match="looped layers before"):
        Config(**{**TINY, "parallel_residual_start": 1})


@pytest.mark.parametrize("train_mode", [False, True])
def test_document_isolation_perturbing_a_document_leaves_the_next_unchanged(train_mode: bool) -> None:
    model = randomized(tiny_model()).train(train_mode)
    ids = docs_ids()
    for k, (lo, hi) in enumerate(((0, 30), (30, 61))):  # perturb every token of document k, BOS included
        other = ids.clone()
        other[:, lo:hi] = torch.randint(2, TINY["vocab_size"], (2, hi - lo))
        diff = (model.forward_logits(ids) - model.forward_logits(other)).abs().amax(-1)
        assert diff[:, lo:hi].max() > 0 and diff[:, hi:].max() == 0, k
    plain = randomized(tiny_model(doc_isolation=False))
    other = ids.clone()
    other[:, 5] = 3 if ids[0, 5] != 3 else 4
    assert (plain.forward_logits(ids) - plain.forward_logits(other))[:, 30:].abs().max() > 0  # without: it leaks


def test_doc_starts_cap_keeps_rows_apart() -> None:
    T = 64  # T // 16 = 4 documents per row are isolated; later ones attend to each other, never across rows
    ids = docs_ids(T, (0, 8, 16, 24, 32, 40), rows=2)
    starts = train_gpt.doc_starts(ids)
    assert starts.tolist() == [[0, 8, 16, 24]] * 2
    mask = train_gpt.doc_mask(ids, None, True).mask[0, 0]
    assert mask[20].nonzero().flatten().tolist() == list(range(16, 21))
    assert mask[45].nonzero().flatten().tolist() == list(range(24, 46))
    single = torch.randint(2, 50, (3, T))
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(3, T, T)
    assert torch.equal(train_gpt.doc_mask(single, None, True).mask[:, 0], causal)


def test_sdpa_mask_equals_fa3_varlen_on_the_strict_stand_in() -> None:
    from tools.cuda_emulation import strict_fa3
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 96, h, 16, generator=g).bfloat16() for h in (4, 2, 2))
    ids = docs_ids()
    with strict_fa3() as stand_in:
        fa3, _ = train_gpt.resolve_attention("fa3", torch.device("cpu"))
        probes = stand_in.calls["flash_attn_varlen_func"]
        y_fa3 = train_gpt.attention(q, k, v, fa3, train_gpt.doc_mask(ids, fa3, True))
        assert stand_in.calls["flash_attn_varlen_func"] == probes + 1
    y_sdpa = train_gpt.attention(q.float(), k.float(), v.float(), None, train_gpt.doc_mask(ids, None, True))
    torch.testing.assert_close(y_fa3.float(), y_sdpa, atol=1e-2, rtol=1e-2)  # FA3 hands back bf16
    assert y_fa3.shape == q.shape


def test_polar_express_orthogonalizes_better_than_the_quintic_at_equal_steps() -> None:
    torch.manual_seed(0)
    errors = {}
    for name, coeffs in train_gpt.NS_COEFFS.items():
        errs = []
        for _ in range(8):
            X = train_gpt.zeropower_via_newtonschulz5(torch.randn(64, 160), 5, torch.float32, coeffs)
            errs.append((X @ X.T - torch.eye(64)).norm() / 8)
        errors[name] = float(torch.stack(errs).mean())
    assert errors["polar"] < 0.7 * errors["quintic"], errors  # measured: 0.19 vs 0.35
    with torch.device("meta"):
        model = GPT(Config())
    calls = []
    opts = train_gpt.Optimizers(model, Config(), ns=lambda g, k, dt, coeffs: calls.append(coeffs) or g)
    opts.muon.ns(torch.zeros(2, 2), 5, torch.float32)
    assert calls == [train_gpt.NS_COEFFS["polar"]]  # the default Muon runs Polar Express


@pytest.mark.parametrize("name, params", [("record_p", 35_944_536), ("record_n", 35_945_671)])
def test_record_config_files_reproduce_parameter_counts(name: str, params: int) -> None:
    from tools.envfile import read_env_file
    cfg = Config.from_env(read_env_file(train_gpt.Path(__file__).parents[1] / "configs" / f"{name}.env"))
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == params  # the records' logs: model_params
    features = (cfg.smear_gate_enabled, cfg.sparse_attn_gate_enabled, cfg.parallel_lanes, cfg.doc_isolation, cfg.muon_ns)
    assert features == ((True, True, 2, True, "polar") if name == "record_n" else (False, False, 1, False, "quintic"))


def test_lane_one_starts_before_the_first_two_lane_layers_skip() -> None:
    """Record N: at the first two-lane layer both lanes are the incoming stream, then the U-Net skip joins lane 0 only.
    (Starting lane 1 after the skip moved N-transplanted logits by up to 6.5.)"""
    model = randomized(tiny_model())  # decoder [2, 3]; layer 3 is the first two-lane layer and takes a skip
    seen: dict[str, torch.Tensor] = {}
    model.blocks[2].register_forward_hook(lambda m, args, out: seen.__setitem__("before", out[0]))
    model.blocks[3].register_forward_pre_hook(lambda m, args: seen.update(x=args[0], lane1=args[5]))
    model.forward_logits(docs_ids())
    assert torch.equal(seen["lane1"], seen["before"]) and not torch.allclose(seen["x"], seen["before"])
