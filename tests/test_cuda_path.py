"""The 8xH100 path on CPU: FlashAttention-3's contract, CUDA autocast's dtype policy, the bf16 precision policy, the
DDP call, and dynamo's recompile limit. Each fixture is shown catching the defect it exists for."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN
from torch.overrides import TorchFunctionMode

import train_gpt
from tools.cuda_emulation import PROBES, FA3ContractError, StrictFA3, cuda_autocast_policy, cuda_policy, strict_fa3
from train_gpt import GPT, Config

ROOT = Path(__file__).resolve().parent.parent
BF16 = torch.bfloat16
TINY = Config(**TINY_TRAIN)


# --- the FlashAttention-3 stand-in enforces FA3's checks ------------------------------------------------------------

def qkv(dtype: torch.dtype = BF16, b: int = 2, t: int = 16, h: int = 4, hkv: int = 2, d: int = 32) -> tuple:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, t, n, d, generator=g).to(dtype) for n in (h, hkv, hkv))


@pytest.mark.parametrize("case, match", [
    (lambda: qkv(torch.float32), "only supports fp16, bf16"),
    (lambda: (qkv()[0].float(), *qkv()[1:]), "only supports fp16, bf16"),
    (lambda: (qkv()[0], qkv()[1].float(), qkv()[2]), "query and key must have the same dtype"),
    (lambda: (*qkv()[:2], qkv(torch.float16)[2]), "query and value must have the same dtype"),
    (lambda: qkv(d=264), "head dimension at most 256"),
    (lambda: qkv(d=12), "multiple of 8"),
    (lambda: qkv(h=6, hkv=4), "must divide number of heads"),
    (lambda: tuple(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in qkv(t=32, d=32)), "contiguous last"),
])
def test_strict_fa3_rejects_what_fa3_rejects(case, match: str) -> None:
    with pytest.raises(FA3ContractError, match=match):
        StrictFA3().flash_attn_func(*case(), causal=True)


def test_strict_fa3_computes_causal_gqa_attention() -> None:
    q, k, v = qkv()
    out = StrictFA3().flash_attn_func(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    assert out.dtype == BF16 and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2)


def test_strict_fa3_varlen_contract() -> None:
    fa3 = StrictFA3()
    q, k, v = (t[0] for t in qkv(b=1, t=12))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = fa3.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    solo = fa3.flash_attn_func(q[None, 5:], k[None, 5:], v[None, 5:], causal=True)[0]
    torch.testing.assert_close(out[5:], solo)  # the second document never sees the first
    with pytest.raises(FA3ContractError, match="int32"):
        fa3.flash_attn_varlen_func(q, k, v, cu.long(), cu.long(), 7, 7, causal=True)
    with pytest.raises(FA3ContractError, match="max_seqlen_q must be provided"):
        fa3.flash_attn_varlen_func(q, k, v, cu, cu, None, 7, causal=True)
    with pytest.raises(FA3ContractError, match="longer than max_seqlen"):
        fa3.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True)


def test_attention_routes_through_fa3_and_pins_one_half_dtype() -> None:
    """train_gpt.attention hands FA3 q, k, v in v's 16-bit dtype even when q and k arrive in fp32 (what CUDA
    autocast's fp32 rms_norm produces), and bf16 when everything is fp32."""
    fa3 = StrictFA3()
    q, k, v = qkv()
    y = train_gpt.attention(q.float(), k.float(), v, fa3.flash_attn_func)
    assert y.dtype == BF16 and fa3.calls["flash_attn_func"] == 1
    assert train_gpt.attention(q.float(), k.float(), v.float(), fa3.flash_attn_func).dtype == BF16
    with pytest.raises(FA3ContractError):  # the defect, re-introduced: no pinning
        fa3.flash_attn_func(q.float(), k.float(), v, causal=True)


# --- CUDA autocast's policy, from the installed torch, applied to CPU autocast ---------------------------------------

def test_cuda_policy_is_read_from_torch_and_reproduced_on_cpu() -> None:
    """The installed torch's AutocastCUDA kernels (seen through fake CUDA tensors) decide each op's dtype; with the
    fixture active, CPU autocast gives the same dtype for every probe. rms_norm is an fp32 op on CUDA from torch 2.12
    (pytorch/pytorch#188955), and not on CPU: the difference behind defect 2."""
    policy = cuda_policy()
    assert policy["rms_norm"] == (BF16, torch.float32, BF16)
    assert policy["square"][1] == torch.float32  # the LeakyReLU^2 MLP hidden is fp32 on CUDA (pow is an fp32 op)
    with cuda_autocast_policy() as forced:
        assert forced["rms_norm"] == torch.float32
        for name, probe in PROBES.items():
            x = torch.randn(8, 8).to(policy[name][0])
            with torch.autocast("cpu", dtype=BF16):
                assert probe(x).dtype == policy[name][1], name
    with torch.autocast("cpu", dtype=BF16):  # and it is gone afterwards
        assert F.rms_norm(torch.randn(4, 8, dtype=BF16), (8,)).dtype == BF16


# Torch functions the model calls that no autocast list touches: views, shape queries, conversions, constructors.
AUTOCAST_NEUTRAL = {"__get__", "__getitem__", "arange", "backward", "flatten", "float", "reshape", "size", "to",
                    "transpose", "view", "add", "sub", "mul", "div", "cos", "sin", "__rdiv__", "__rpow__",
                    # document masks (integer and boolean tensors) and SmearGate's masked_fill (keeps its dtype)
                    "__and__", "__eq__", "__or__", "contiguous", "expand", "le", "masked_fill", "searchsorted", "sort",
                    "where"}


def model_functions(model: GPT, ids: torch.Tensor) -> set[str]:
    """Names of the torch functions a forward and backward of the model call under bf16 autocast."""
    names: set[str] = set()

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            names.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Spy():
        with torch.autocast("cpu", dtype=BF16):
            loss = model(ids, ids)
        loss.backward()
    return names


def test_every_function_the_model_calls_is_probed_or_neutral() -> None:
    """A new op in the model must be added to PROBES (so its CUDA dtype is checked) or shown autocast-neutral.
    __rdiv__ / __rpow__ (fp32 ops on CUDA) only ever see the fp32 RoPE frequencies."""
    model = train_gpt.apply_precision(GPT(TINY), "bf16")
    model.looping = True
    probed = {name.partition(".")[0] for name in PROBES} | {"rms_norm", "scaled_dot_product_attention"}
    missing = model_functions(model, torch.randint(0, TINY.vocab_size, (2, 32))) - probed - AUTOCAST_NEUTRAL
    # SDPA (CPU path only; the CUDA path runs FA3) is a lower-precision op on both devices (autocast_mode.cpp).
    assert missing == set(), f"classify these for the CUDA autocast emulation: {sorted(missing)}"


# --- the bf16 precision policy and the FA3 path, under CUDA's autocast policy ----------------------------------------

def tiny_model(precision: str, fa3: StrictFA3 | None) -> GPT:
    torch.manual_seed(0)
    fn = train_gpt.FA3(fa3.flash_attn_func, fa3.flash_attn_varlen_func) if fa3 else None
    model = train_gpt.apply_precision(GPT(TINY, fn), precision)
    model.looping = True
    return model


def test_bf16_policy_matches_record_p() -> None:
    """Record P: the tied embedding in bf16 (so the residual stream is bf16), block matrices and control tensors fp32
    masters, matmuls under bf16 autocast."""
    model = tiny_model("bf16", None)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == BF16
    assert set(dtypes.values()) == {torch.float32}
    assert list(model.buffers()) == []  # nothing for DDP to sync: its buffer keyword differs across torch versions
    assert all(p.dtype == torch.float32 for p in train_gpt.apply_precision(GPT(TINY), "fp32").parameters())
    rt = train_gpt.Runtime(precision="bf16")
    assert rt.ns_dtype == BF16 and train_gpt.Optimizers(model, TINY, ns_dtype=rt.ns_dtype).muon.dtype == BF16
    with rt.amp():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
    assert train_gpt.Runtime().ns_dtype == torch.float32


def test_fa3_path_under_cuda_autocast_policy_trains() -> None:
    """Forward and backward through the real attention() with the strict FA3 stand-in, CUDA's autocast policy and
    the bf16 policy: what 8xH100 runs. The residual stream stays bf16 (as in record P on torch 2.9.1)."""
    with strict_fa3() as fa3, cuda_autocast_policy():
        model = tiny_model("bf16", fa3)
        streams = []
        model.blocks[0].register_forward_hook(lambda m, i, o: streams.append(o[0].dtype))
        ids = torch.randint(0, TINY.vocab_size, (2, 32))
        with torch.autocast("cpu", dtype=BF16):
            loss = model(ids, ids)
        loss.backward()
    assert fa3.calls["flash_attn_varlen_func"] >= TINY.num_layers and torch.isfinite(loss)  # documents isolated
    assert set(streams) == {BF16}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_defect_2_is_caught_only_with_the_cuda_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-introduce defect 2 (rms_norm output not pinned, q/k/v handed to FA3 as they come): under CUDA's autocast
    policy FA3 gets fp32 q and k and rejects them; plain CPU autocast hides it, which is why the fixture exists."""
    monkeypatch.setattr(train_gpt, "rms_norm", lambda x: F.rms_norm(x, (x.size(-1),)))
    monkeypatch.setattr(train_gpt, "attention", lambda q, k, v, fa3=None, docs=None: fa3(q, k, v, causal=True))
    ids = torch.randint(0, TINY.vocab_size, (2, 32))
    with strict_fa3() as fa3:
        with torch.autocast("cpu", dtype=BF16):
            tiny_model("bf16", fa3)(ids, ids)  # CPU autocast: passes
        with cuda_autocast_policy(), torch.autocast("cpu", dtype=BF16), pytest.raises(FA3ContractError, match="fp16, bf16"):
            tiny_model("bf16", fa3)(ids, ids)


def test_attention_resolution() -> None:
    cpu = torch.device("cpu")
    assert train_gpt.resolve_attention("auto", cpu) == (None, "sdpa (no CUDA)")
    assert train_gpt.resolve_attention("sdpa", cpu)[0] is None
    with strict_fa3():
        fn, note = train_gpt.resolve_attention("fa3", cpu)  # the stand-in passes the probe call
    assert fn is not None and note == "flash_attn_interface ok"
    with pytest.raises(RuntimeError, match="ATTENTION=fa3 but FlashAttention-3 is unusable: ModuleNotFoundError"):
        with contextlib.ExitStack() as stack:
            stack.enter_context(pytest.MonkeyPatch.context()).setitem(sys.modules, "flash_attn_interface", None)
            train_gpt.resolve_attention("fa3", cpu)


def test_unusable_fa3_is_reported_not_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wheel that imports but fails on its first call (another torch/CUDA build) is caught by the probe call."""
    broken = StrictFA3().module()
    broken.flash_attn_func = lambda *a, **k: (_ for _ in ()).throw(OSError("undefined symbol: _ZN3c10"))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", broken)
    fn, why = train_gpt.load_fa3(torch.device("cpu"))
    assert fn is None and why == "OSError: undefined symbol: _ZN3c10"


# --- the tiny pipeline in the GPU's precision ------------------------------------------------------------------------

@pytest.mark.slow
def test_bf16_pipeline_on_fa3_under_cuda_policy(tiny_dataset, tmp_path: Path) -> None:
    """train -> Hessians -> GPTQ -> artifact -> reload -> quantized / sliding / TTT, in record P's CUDA precision,
    through the strict FA3 stand-in, with CUDA's autocast policy. Defect 1 (bf16 Hessians) and defect 2 (fp32 q/k
    into FA3) both crashed this pipeline."""
    cfg = Config(**TINY_TRAIN, data_path=str(tiny_dataset.data_dir), tokenizer_path=str(tiny_dataset.tokenizer),
                 out_dir=str(tmp_path), run_id="bf16", seed=3, precision="bf16", attention="fa3")
    with strict_fa3() as fa3, cuda_autocast_policy():
        rt = train_gpt.Runtime(precision="bf16", fa3=train_gpt.resolve_attention("fa3", torch.device("cpu"))[0])
        summary = train_gpt.run(cfg, rt)
    assert fa3.calls["flash_attn_varlen_func"] > 100  # training and every eval isolate documents
    assert summary["precision"] == "bf16" and summary["attention"] == "fa3"
    assert set(summary["evals"]) == {"pre-quantization post-ema", "quantized", "quantized_sliding_window",
                                     "quantized_ttt_phased"}
    assert all(0 < e["val_bpb"] < 12 for e in summary["evals"].values())
    log = (tmp_path / "logs" / "bf16.txt").read_text()
    assert "attention:fa3 compile:False precision:bf16" in log
    assert "GPTQ:collected" in log and "artifact: final_model.int6.ptz sha256:" in log


FA3_SHIM = """from tools.cuda_emulation import StrictFA3
_fa3 = StrictFA3()
flash_attn_func, flash_attn_varlen_func = _fa3.flash_attn_func, _fa3.flash_attn_varlen_func
"""


@pytest.mark.slow
def test_bf16_pipeline_two_gloo_ranks(tiny_dataset, tmp_path: Path) -> None:
    """The same pipeline under torchrun with 2 gloo ranks: DDP (no buffer keyword), rank-sharded Muon in bf16,
    Hessians all-reduced, every rank reloading the artifact; FA3 is the strict stand-in in each rank."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "flash_attn_interface.py").write_text(FA3_SHIM)
    env = {**os.environ, **{k.upper(): str(v) for k, v in TINY_TRAIN.items()}, "DATA_PATH": str(tiny_dataset.data_dir),
           "TOKENIZER_PATH": str(tiny_dataset.tokenizer), "OUT_DIR": str(tmp_path / "out"), "RUN_ID": "ddp",
           "PRECISION": "bf16", "ATTENTION": "fa3", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["precision"] == "bf16" and summary["attention"] == "fa3"
    assert "FutureWarning" not in proc.stderr or "broadcast_buffers" not in proc.stderr
    assert 0 < summary["final_val_bpb"] < 12


# --- torch.compile: every compiled function stays well inside dynamo's recompile limit -------------------------------

def cache_entries(fn: object) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    return len(_debug_get_cache_entry_list(fn.__code__))


@pytest.mark.slow
def test_compiled_pipeline_recompiles_within_limit(tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COMPILE=1 through the whole tiny pipeline (train with the looping switch, in-loop and final evals, Hessians,
    reload, sliding, TTT). Dynamo keeps one cache entry per guard-distinct variant of a compiled frame; with
    fullgraph=True the (limit+1)-th is a hard error. The eager backend compiles the same frames and guards, without
    inductor's minutes of codegen on CPU."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    from data.shards import load_val_tokens
    from evals.phased_ttt import context_sizes, find_docs, slot_sizes
    val = load_val_tokens(str(tiny_dataset.data_dir / "fineweb_val_*.bin"), TINY_TRAIN["eval_seq_len"])
    docs = len(find_docs(val))  # a TTT batch size that leaves a short batch of fewer rows (its own compiled shape)
    bsz = next(b for b in (3, 5, 6, 7) if 0 < docs % b and 1 << (docs % b - 1).bit_length() < b)
    cfg = Config(**{**TINY_TRAIN, "val_loss_every": 3, "ttt_batch_size": bsz}, data_path=str(tiny_dataset.data_dir),
                 tokenizer_path=str(tiny_dataset.tokenizer), out_dir=str(tmp_path), run_id="compiled", seed=5,
                 compile="1")
    real_ttt, during = train_gpt.eval_phased_ttt, []

    def ttt(*args, **kwargs):  # the eval clock runs here: the warm-up must have compiled every shape already
        before = cache_entries(train_gpt.ttt_forward)
        out = real_ttt(*args, **kwargs)
        during.append(cache_entries(train_gpt.ttt_forward) - before)
        return out

    monkeypatch.setattr(train_gpt, "eval_phased_ttt", ttt)
    try:
        summary = train_gpt.run(cfg, train_gpt.Runtime())
        counts = {f.__name__: cache_entries(f) for f in (GPT.forward, GPT.forward_logits, train_gpt.ttt_forward,
                                                         train_gpt.zeropower_via_newtonschulz5)}
    finally:
        torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    assert summary["steps"] == cfg.iterations and min(counts.values()) >= 1, counts
    # forward and forward_logits: looping off and on (the reloaded artifact's model shares the looped entry: the
    # guards are on attributes, and every eval batch has one static shape). The TTT forward: one per row count and
    # row length (TTT_EVAL_SEQ_LEN=64: 16, 32, 64; record N's 2048: 256..2048, four; row counts: full batches and
    # the short batch's power of two), all compiled by the warm-up. Newton-Schulz: one per matrix shape.
    slots = slot_sizes(val, cfg)
    assert len(slots) == 2 and slots[-1] == bsz  # full batches and the short batch's power of two
    assert during == [0]  # nothing compiled on the eval clock
    ttt = len(slots) * len(context_sizes(cfg.ttt_chunk_size, cfg.ttt_eval_seq_len, True))
    assert counts == {"forward": 2, "forward_logits": 2, "ttt_forward": ttt, "zeropower_via_newtonschulz5": 4}, counts
    assert limit >= 16 and max(counts.values()) <= limit // 2


def test_static_eval_shapes_pad_instead_of_recompiling() -> None:
    """With static shapes every forward sees batch_windows rows (the tail batch is padded and masked), so a compiled
    scorer compiles once; the sums are the same as without padding."""
    model = GPT(TINY).eval()
    model.looping = True
    tokens = torch.randint(0, TINY.vocab_size, (1000,))
    luts = (torch.ones(TINY.vocab_size, dtype=torch.int16), torch.zeros(TINY.vocab_size, dtype=torch.bool),
            torch.zeros(TINY.vocab_size, dtype=torch.bool))
    shapes = []

    def logits(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return model.forward_logits(x)

    starts = train_gpt.window_starts(999, 64, 32)  # 30 windows: 4 batches of 8, the last one short
    ev = train_gpt.EvalContext(luts, 8)
    plain = train_gpt.score_windows(logits, tokens, starts, 64, 32, ev)
    assert shapes[-1] == (len(starts) % 8, 64)
    shapes.clear()
    padded = train_gpt.score_windows(logits, tokens, starts, 64, 32, dataclasses.replace(ev, static_shapes=True))
    assert set(shapes) == {(8, 64)}
    torch.testing.assert_close(padded, plain)
