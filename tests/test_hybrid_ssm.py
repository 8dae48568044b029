"""experiments/hybrid_ssm.py: the chunked SSD scan, document isolation, compile, gradient isolation, switches, the
forced gate, CPC, roles, and the hybrid run end to end (in process and under torchrun with 2 gloo ranks)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_MODEL, TINY_TRAIN

import train_gpt
from experiments import hybrid_ssm as hy

BOS = train_gpt.BOS_ID


def tiny_cfg(**overrides: object) -> hy.HybridConfig:
    return hy.HybridConfig(**{**TINY_MODEL, "ssm_chunk": 16, **overrides})


def tiny_model(seed: int = 0, **overrides: object) -> hy.HybridGPT:
    torch.manual_seed(seed)
    return hy.HybridGPT(tiny_cfg(**overrides))


def ids_with_docs(B: int = 2, T: int = 64, bos_at: tuple[int, ...] = (0, 23, 40), seed: int = 1) -> torch.Tensor:
    ids = torch.randint(2, 512, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[:, list(bos_at)] = BOS
    return ids


def scan_inputs(B: int, T: int, H: int, P: int, N: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g, dtype=dtype)
    dt = torch.rand(B, T, H, generator=g, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(H, generator=g, dtype=dtype) * 4 - 0.1
    Bm, Cm = torch.randn(B, T, N, generator=g, dtype=dtype), torch.randn(B, T, N, generator=g, dtype=dtype)
    reset = torch.rand(B, T, generator=g) < 0.08
    return x, dt, A, Bm, Cm, reset


# --- the scan ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
def test_chunked_scan_equals_sequential_recurrence(chunk: int) -> None:
    """fp64: every chunk size (incl. ones that do not divide T = 45: zero padding) gives the recurrence, resets too."""
    x, dt, A, Bm, Cm, reset = scan_inputs(2, 45, 3, 4, 5, torch.float64)
    assert reset.any()
    ref = hy.ssd_reference(x, dt, A, Bm, Cm, reset)
    torch.testing.assert_close(hy.ssd_scan(x, dt, A, Bm, Cm, reset, chunk), ref, rtol=1e-10, atol=1e-10)


def test_scan_resets_state_and_pins_fp32() -> None:
    """A reset position forgets everything before it (outputs from there on equal a fresh scan of the tail); the
    scan runs in fp32 under bf16 autocast (same result as without it) and has finite gradients through resets."""
    x, dt, A, Bm, Cm, reset = scan_inputs(1, 32, 2, 4, 3, torch.float32, seed=3)
    reset[:] = False
    reset[0, 13] = True
    full = hy.ssd_scan(x, dt, A, Bm, Cm, reset, 8)
    tail = hy.ssd_scan(x[:, 13:], dt[:, 13:], A, Bm[:, 13:], Cm[:, 13:], reset[:, 13:], 8)
    torch.testing.assert_close(full[:, 13:], tail, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = hy.ssd_scan(x, dt, A, Bm, Cm, reset, 8)
    assert auto.dtype == torch.float32 and torch.equal(auto, full)
    x.requires_grad_(True), dt.requires_grad_(True)
    hy.ssd_scan(x, dt, A, Bm, Cm, reset, 8).square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(dt.grad).all()


def test_outputs_of_a_document_never_depend_on_earlier_documents() -> None:
    """Changing document 1's tokens leaves document 2's SSM states and hybrid logits unchanged (SSD reset, the
    conv's taps, the decoder's document isolation), while its own positions do change."""
    model = tiny_model().eval()
    for p in model.ssm.parameters():  # out_proj starts at zero: give the SSM blocks a real effect
        p.data.add_(torch.randn_like(p) * 0.05)
    ids = ids_with_docs(bos_at=(0, 30))
    other = ids.clone()
    other[:, 1:30] = torch.randint(2, 512, (2, 29), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        z1, z2 = model.ssm_hidden(ids), model.ssm_hidden(other)
        l1, l2 = model.forward_logits(ids), model.forward_logits(other)
    torch.testing.assert_close(z1[:, 30:], z2[:, 30:], rtol=0, atol=1e-6)
    torch.testing.assert_close(l1[:, 30:], l2[:, 30:], rtol=0, atol=1e-5)
    assert (z1[:, 1:30] - z2[:, 1:30]).abs().max() > 1e-2


def test_fullgraph_compile_of_the_hybrid_compiles_once() -> None:
    """torch.compile(fullgraph=True) of the SSM block (forward + backward, aot_eager: AOT autograd without
    inductor's minute of CPU codegen) and of the whole training forward (dynamo only: no graph break): one graph
    each, no recompile over 3 calls, the same numbers as eager, and the stats buffer mutation happens."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = tiny_model(ssm_chunk=8)
    ids = ids_with_docs(T=32, bos_at=(0, 11))
    doc, reset = hy.doc_ids(ids), ids == BOS
    x = torch.randn(2, 32, 64, requires_grad=True)
    counter = CompileCounterWithBackend("aot_eager")
    blk = torch.compile(model.ssm[0], fullgraph=True, backend=counter)
    for _ in range(3):
        y = blk(x, doc, reset)
        y.square().sum().backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(y, model.ssm[0](x, doc, reset))
    counter = CompileCounterWithBackend("eager")
    train = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(3):
        model.hybrid_stats.zero_()
        train(ids, ids).backward()
    assert counter.frame_count == 1 and float(model.hybrid_stats[1]) == ids.numel()


# --- gradients, switches, gate, CPC --------------------------------------------------------------------------------

def test_main_loss_never_reaches_the_code_selector() -> None:
    """CE (the eval forward's loss) has no gradient path to the regime selector or the codebook, but trains the
    regime embedding; the VQ loss reaches only the selector and the codebook (its input z is detached)."""
    model = tiny_model().train()
    nn_init = model.gate_out.weight.data
    nn_init.normal_(std=0.1)  # zero at init: the gate would pass no gradient to its inputs yet
    ids = ids_with_docs()
    parts = model.hybrid_parts(ids)
    logits = F.linear(parts["out"], model.tok_emb.weight)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    sel, book, emb = model.regime_selector.weight, model.regime_codebook, model.regime_emb
    g_sel, g_book, g_emb = torch.autograd.grad(ce, [sel, book, emb], retain_graph=True, allow_unused=True)
    assert g_sel is None and g_book is None and g_emb is not None and g_emb.abs().sum() > 0
    others = [p for n, p in model.named_parameters() if not n.startswith("regime_")]
    grads = torch.autograd.grad(parts["vq"], [sel, book, *others], allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert all(g is None for g in grads[2:])


def test_training_loss_is_ce_plus_cpc_plus_vq_and_eval_is_ce() -> None:
    model = tiny_model(cpc_weight=0.5)
    ids, targets = ids_with_docs(), ids_with_docs(seed=2)  # 2 x 63 anchors <= CPC_ANCHORS: no sampling
    with torch.no_grad():
        ce = model.eval()(ids, targets)
        train = model.train()(ids, targets)
        parts = model.hybrid_parts(ids)
        cpc = hy.cpc_infonce(parts["out"], parts["z"], hy.doc_ids(ids), [lin.weight for lin in model.cpc])
    torch.testing.assert_close(ce, F.cross_entropy(model.eval().forward_logits(ids).flatten(0, 1), targets.flatten()))
    assert float(cpc) > 0 and float(parts["vq"]) > 0
    torch.testing.assert_close(train, ce + 0.5 * cpc + parts["vq"])


SWITCHES = {  # config override -> parameter name prefixes it removes
    "ssm_conv=0": (dict(ssm_conv=0), ("ssm.0.conv_w",)),
    "memory_slots=0": (dict(memory_slots=0), ("mem_keys", "mem_values")),
    "regime_codes=0": (dict(regime_codes=0), ("regime_",)),
    "cpc_weight=0": (dict(cpc_weight=0.0), ("cpc.",)),
    "hybrid_gate=0": (dict(hybrid_gate=False, memory_slots=0, regime_codes=0), ("gate_", "mem_", "regime_")),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_removes_its_parameters_and_still_trains(name: str) -> None:
    override, gone = SWITCHES[name]
    full = {n for n, _ in tiny_model().named_parameters()}
    with hy.installed():
        model = tiny_model(**override).train()
        names = {n for n, _ in model.named_parameters()}
        assert any(n.startswith(gone) for n in full) and not any(n.startswith(gone) for n in names)
        opts = train_gpt.Optimizers(model, model.cfg)
        ids = ids_with_docs(B=4)
        losses = [float(train_gpt.train_step(model, opts, [(ids, ids.roll(-1, 1))], 0.3, train_gpt.Runtime().amp))
                  for _ in range(4)]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]


def test_bf16_precision_policy() -> None:
    """PRECISION=bf16 (bf16 embedding, bf16 autocast; the CUDA policy, also on CPU): a training step and an eval
    forward run, the SSD inside still in fp32, logits finite."""
    with hy.installed():
        model = train_gpt.apply_precision(tiny_model(), "bf16").train()
        rt = train_gpt.Runtime(precision="bf16")
        opts = train_gpt.Optimizers(model, model.cfg, ns_dtype=rt.ns_dtype)
        ids = ids_with_docs()
        loss = train_gpt.train_step(model, opts, [(ids, ids.roll(-1, 1))], 0.3, rt.amp)
        with torch.no_grad(), rt.amp():
            logits = model.eval().forward_logits(ids)
    assert torch.isfinite(loss) and torch.isfinite(logits.float()).all() and logits.dtype == torch.bfloat16


def test_hybrid_gate_off_is_the_fixed_half_mix() -> None:
    model = tiny_model(hybrid_gate=False, memory_slots=0, regime_codes=0).eval()
    ids = ids_with_docs()
    with torch.no_grad():
        parts = model.hybrid_parts(ids)
    assert torch.equal(parts["g"], torch.full_like(parts["g"], 0.5))
    torch.testing.assert_close(parts["out"], train_gpt.rms_norm(0.5 * parts["h"] + 0.5 * parts["z"]))
    with pytest.raises(ValueError, match="only feed the gate"):
        tiny_cfg(hybrid_gate=False)
    with pytest.raises(ValueError, match="multiples of SSM_CHUNK"):
        tiny_cfg(ssm_chunk=48)


def test_gate_force_selects_the_decoder_or_the_ssm_path() -> None:
    """gate_force 1.0 gives the decoder-only logits (GPT's own stack and head), 0.0 the SSM-only logits; NaN
    (default) is the learned mix, different from both."""
    model = tiny_model().eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    ids = ids_with_docs()

    def head(x: torch.Tensor) -> torch.Tensor:
        c = model.cfg.logit_softcap
        return c * torch.tanh(F.linear(x, model.tok_emb.weight) / c)

    with torch.no_grad():
        learned = model.forward_logits(ids)
        surface = head(train_gpt.GPT.forward_hidden(model, ids))
        latent = head(model.ssm_hidden(ids))
        model.gate_force.fill_(1.0)
        forced1 = model.forward_logits(ids)
        model.gate_force.fill_(0.0)
        forced0 = model.forward_logits(ids)
    torch.testing.assert_close(forced1, surface, rtol=0, atol=1e-5)
    torch.testing.assert_close(forced0, latent, rtol=0, atol=1e-5)
    assert (learned - surface).abs().max() > 1e-3 and (learned - latent).abs().max() > 1e-3


def test_cpc_masks_document_crossings_and_learns_a_predictable_sequence() -> None:
    """A pair whose target is in another document contributes nothing (all-BOS rows: loss 0, no gradient); on a
    sequence whose future latent is a fixed map of the present, training the predictors lowers the loss."""
    torch.manual_seed(0)
    src, z = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    w = [torch.zeros(8, 8, requires_grad=True) for _ in range(2)]
    every_bos = hy.doc_ids(torch.full((2, 16), BOS))
    loss = hy.cpc_infonce(src, z, every_bos, w)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert all(float(p.grad.abs().sum()) == 0 for p in w)
    one_doc = hy.doc_ids(torch.full((2, 16), 5))
    src, mix = torch.randn(2, 16, 8), torch.randn(8, 8)
    z = torch.cat((torch.randn(2, 1, 8), src[:, :-1] @ mix), dim=1)  # z_{t+1} = M src_t
    opt = torch.optim.Adam(w[:1], lr=0.05)
    first = None
    for _ in range(60):
        loss = hy.cpc_infonce(src, z, one_doc, w[:1])
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_roles_and_artifact_state() -> None:
    """Muon gets every hybrid matrix (2-D maps), AdamW the vectors and tables; quant roles name every 2-D tensor
    GPTQ would quantize ('matrix' for the hybrid's); the exported state has no CPC predictors and reloads strictly."""
    model = tiny_model()
    with hy.installed():
        roles = train_gpt.param_roles(model)
        qroles = train_gpt.quant_roles(model)
    assert roles["ssm.0.in_proj.weight"] == roles["gate_in.weight"] == roles["mem_values"] == "muon"
    assert roles["cpc.0.weight"] == roles["regime_selector.weight"] == "muon"
    assert roles["regime_codebook"] == roles["regime_emb"] == roles["ssm.0.conv_w"] == roles["ssm.0.A_log"] == "scalar"
    named = dict(model.named_parameters())
    assert all(named[n].ndim == 2 for n, r in roles.items() if r == "muon")
    assert {n for n, r in qroles.items() if r == "matrix"} == set(hy.hybrid_matrices(model))
    assert qroles["ssm.1.out_proj.weight"] == "matrix" and qroles["blocks.0.attn.c_q.weight"] == "attn"
    model.export_state = True
    state = model.state_dict()
    assert not any(k.startswith("cpc.") for k in state) and "cpc.0.weight" not in hy.hybrid_quant_roles(model)
    assert not any(k in state for k in ("gate_force", "hybrid_stats", "hybrid_codes"))
    roles = {k: r for k, r in hy.hybrid_quant_roles(model).items() if state[k].numel() > 1024}  # as Run.serialize
    train_gpt.quantize_state_dict(state, {}, roles=roles, passthrough_numel=1024, method="rtn")  # every role named
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "gate_in.weight"}, strict=True)


def test_ttt_adapters_reach_the_hybrid() -> None:
    """The TTT path (forward_logits with adapters) runs through the hybrid: adapters with B != 0 change the logits."""
    model = tiny_model().eval()
    ids = ids_with_docs(B=2, T=40, bos_at=(0, 23))  # a TTT context length that is not a multiple of SSM_CHUNK (padded scan)
    lora = train_gpt.TTTAdapters(model, 2, 4, 8.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.forward_logits(ids)
        torch.testing.assert_close(train_gpt.ttt_forward(model, ids, lora), plain)
        for p in lora.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        assert (train_gpt.ttt_forward(model, ids, lora) - plain).abs().max() > 1e-3


def test_no_top_level_name_collides_with_the_packed_namespace() -> None:
    """The record packer inlines train_gpt and its modules into one namespace with this file."""
    def names(path: Path) -> set[str]:
        out = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, ast.Assign):
                out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out.add(node.target.id)
        return out
    inlined = [ROOT / "train_gpt.py", ROOT / "data" / "shards.py", *(ROOT / "quant").glob("*.py"),
               *(ROOT / "evals").glob("*.py")]
    ours = names(ROOT / "experiments" / "hybrid_ssm.py")
    clash = ours & set().union(*map(names, inlined))
    assert not clash, clash


# --- the run -------------------------------------------------------------------------------------------------------

GATE_LINE = re.compile(r"^hybrid_gate step:(\d+) layer:0 mean:([0-9.]+) codes:(\d+)/16$", re.M)
STANDARD = ["pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt_phased"]


def test_hybrid_run_in_process(tiny_dataset, tmp_path: Path) -> None:
    """installed() runs the whole pipeline with the hybrid: gate trajectory lines after each train line, the
    forced-gate scores (before the standard ones, so the final label is still the last standard eval: the phased
    TTT, adapters through the hybrid), the artifact reloads into the same quantized model, and the globals come
    back afterwards."""
    before = {k: getattr(train_gpt, k) for k in hy.PATCHES}
    with hy.installed():
        cfg = train_gpt.Config(**{**TINY_TRAIN, "ttt_chunk_size": 64}, data_path=str(tiny_dataset.data_dir),
                               tokenizer_path=str(tiny_dataset.tokenizer), out_dir=str(tmp_path), run_id="hy", seed=7)
        assert isinstance(cfg, hy.HybridConfig)
        summary = train_gpt.run(cfg, train_gpt.Runtime())
        qmodel = train_gpt.load_quantized_model(tmp_path / "final_model.int6.ptz", cfg, torch.device("cpu"))
        r = train_gpt.Run(cfg, train_gpt.Runtime())
        reloaded = r.plain_eval(qmodel.forward_logits)
    assert {k: getattr(train_gpt, k) for k in hy.PATCHES} == before
    assert isinstance(qmodel, hy.HybridGPT) and isinstance(r, hy.HybridRun)
    log = (tmp_path / "logs" / "hy.txt").read_text()
    steps = [int(m.group(1)) for m in GATE_LINE.finditer(log)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert re.search(r"^6/6 train_loss:.*\nhybrid_gate step:6 ", log, re.M)
    assert re.search(r"^hybrid_gate eval:val layer:0 mean:[0-9.]+ codes:\d+/16$", log, re.M)
    assert "source_file: experiments/hybrid_ssm.py" in log
    evals = summary["evals"]
    assert list(evals) == [STANDARD[0], "quantized_gate1", "quantized_gate0", *STANDARD[1:]]
    assert summary["final_label"] == "quantized_ttt_phased"
    assert summary["final_val_bpb"] == evals["quantized_ttt_phased"]["val_bpb"]
    assert evals["quantized_gate1"]["val_bpb"] != evals["quantized_gate0"]["val_bpb"]
    assert reloaded[1] == pytest.approx(evals["quantized"]["val_bpb"], rel=1e-6)
    labels = re.findall(r"^(\S+) val_loss:[0-9.]+ val_bpb:", log, re.M)
    assert labels[-1] == "quantized_ttt_phased"
    assert json.loads((tmp_path / "run_summary.json").read_text())["final_label"] == "quantized_ttt_phased"


def test_hybrid_log_every_counts_training_steps(tiny_dataset, tmp_path: Path) -> None:
    """HYBRID_LOG_EVERY=k > 0: a line every k timed steps (warm-up steps not counted), whatever TRAIN_LOG_EVERY."""
    ema_update = train_gpt.ema_update_
    with hy.installed():
        cfg = train_gpt.Config(**{**TINY_TRAIN, "iterations": 4, "hybrid_log_every": 2, "train_log_every": 100},
                               data_path=str(tiny_dataset.data_dir), tokenizer_path=str(tiny_dataset.tokenizer),
                               out_dir=str(tmp_path), run_id="every", seed=7)
        r = train_gpt.Run(cfg, train_gpt.Runtime(), log_to_file=True)
        r.log_header()
        r.train()
    log = (tmp_path / "logs" / "every.txt").read_text()
    assert [int(m.group(1)) for m in GATE_LINE.finditer(log)] == [2, 4]
    assert train_gpt.ema_update_ is ema_update


@pytest.mark.slow
def test_hybrid_torchrun_two_gloo_ranks(tiny_dataset, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 experiments/hybrid_ssm.py`: DDP around the hybrid (its buffers included), the
    forced-gate scores on 2 ranks, the same log / artifact / run_summary.json as train_gpt.py."""
    env = {**os.environ, **{k.upper(): str(v) for k, v in TINY_TRAIN.items()}, "DATA_PATH": str(tiny_dataset.data_dir),
           "TOKENIZER_PATH": str(tiny_dataset.tokenizer), "OUT_DIR": str(tmp_path), "RUN_ID": "ddp",
           "OMP_NUM_THREADS": "1", "ITERATIONS": "3", "SSM_CHUNK": "32", "TTT_ENABLED": "0",
           "SLIDING_WINDOW_ENABLED": "0"}  # the phased TTT runs through the hybrid in test_hybrid_run_in_process
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "experiments" / "hybrid_ssm.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_label"] == "quantized"
    assert list(summary["evals"])[1:] == ["quantized_gate1", "quantized_gate0", "quantized"]
    assert summary["config"]["ssm_chunk"] == 32 and "quantized_gate0" in summary["evals"]
    assert (tmp_path / "final_model.int6.ptz").exists()
    log = (tmp_path / "logs" / "ddp.txt").read_text()
    assert len(GATE_LINE.findall(log)) == 3 and "quantized_gate1 val_loss:" in log
