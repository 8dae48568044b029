"""CUDA-only contracts reproduced on CPU, so a CPU check fails where an 8xH100 run would crash (tests and preflight).

* `StrictFA3`: a stand-in for the `flash_attn_interface` module of FlashAttention-3 (Hopper). It enforces the input
  checks of FA3's C++ entry points (flash-attention `hopper/flash_api.cpp`): q, k, v of one dtype in {fp16, bf16};
  (B, T, H, D) or, varlen, (total, H, D); last dim contiguous; head dim <= 256 and a multiple of 8; H divisible by
  Hkv; varlen `cu_seqlens` int32, contiguous, with max_seqlen given. It computes attention with SDPA in fp32 and
  returns the inputs' dtype, like the real kernel.
* `cuda_autocast_policy()`: while active, CPU autocast applies CUDA autocast's cast policy of the installed torch to
  the ops in `PROBES`. The policy is read from torch itself: each probe runs on fake CUDA tensors (FakeTensorMode)
  under CUDA autocast, and every op whose CUDA output dtype differs from CPU autocast's gets an AutocastCPU kernel
  that casts its floating inputs to CUDA's dtype. On torch >= 2.12 this is how `rms_norm` becomes an fp32 op.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch._dynamo  # noqa: F401  imported before any test patches torch.cuda.is_available (see _fake_cuda_dtype)
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

HALF = (torch.float16, torch.bfloat16)


class FA3ContractError(RuntimeError):
    """An input FlashAttention-3 would reject (the message is the kernel's own check)."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise FA3ContractError(msg)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dims: int) -> None:
    _need(q.dim() == dims and k.dim() == dims and v.dim() == dims, f"q, k, v must be {dims}-D, got "
          f"{q.dim()}, {k.dim()}, {v.dim()}")
    _need(q.dtype in HALF, f"FlashAttention only supports fp16, bf16, and fp8_e4m3 data type (q is {q.dtype})")
    _need(k.dtype == q.dtype, f"query and key must have the same dtype ({q.dtype} vs {k.dtype})")
    _need(v.dtype == q.dtype, f"query and value must have the same dtype ({q.dtype} vs {v.dtype})")
    _need(q.device == k.device == v.device, "q, k, v must be on one device")
    _need(all(t.stride(-1) == 1 for t in (q, k, v)), "Input tensor must have contiguous last dimension")
    _need(q.size(-1) <= 256, f"FlashAttention forward only supports head dimension at most 256 (got {q.size(-1)})")
    _need(q.size(-1) % 8 == 0, f"head_size should be a multiple of 8 (got {q.size(-1)})")
    _need(k.shape == v.shape and k.size(-1) == q.size(-1), f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q")
    _need(q.size(-2) % k.size(-2) == 0, "Number of heads in key/value must divide number of heads in query")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> Tensor:
    """(B, T, H, D) attention in fp32 (autocast off, as inside the real kernel), returned in q's dtype."""
    with torch.autocast(q.device.type, enabled=False):
        y = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                           v.float().transpose(1, 2), is_causal=causal, scale=scale, enable_gqa=True)
    return y.transpose(1, 2).to(q.dtype).contiguous()


class StrictFA3:
    """The module object installed as `flash_attn_interface`; `calls` counts the calls of each entry point."""

    def __init__(self) -> None:
        self.calls = {"flash_attn_func": 0, "flash_attn_varlen_func": 0}

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("flash_attn_interface")
        mod.flash_attn_func = self.flash_attn_func
        mod.flash_attn_varlen_func = self.flash_attn_varlen_func
        return mod

    def flash_attn_func(self, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None,
                        causal: bool = False, window_size: tuple[int, int] = (-1, -1), **_: object) -> Tensor:
        _check_qkv(q, k, v, 4)
        _need(q.size(0) == k.size(0), "batch_size must be equal to batch_size_k")
        _need(window_size == (-1, -1), "the stand-in models full (windowless) attention only")
        self.calls["flash_attn_func"] += 1
        return _sdpa(q, k, v, causal, softmax_scale)

    def flash_attn_varlen_func(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                               softmax_scale: float | None = None, causal: bool = False,
                               window_size: tuple[int, int] = (-1, -1), **_: object) -> Tensor:
        _check_qkv(q, k, v, 3)
        for name, cu, total, mx in (("q", cu_seqlens_q, q.size(0), max_seqlen_q),
                                    ("k", cu_seqlens_k, k.size(0), max_seqlen_k)):
            _need(cu.dtype == torch.int32, f"cu_seqlens_{name} must have dtype torch.int32 (got {cu.dtype})")
            _need(cu.dim() == 1 and cu.is_contiguous(), f"cu_seqlens_{name} must be a contiguous 1-D tensor")
            _need(mx is not None, f"max_seqlen_{name} must be provided if cu_seqlens_{name} is provided")
            lens = cu.diff()
            _need(int(cu[0]) == 0 and bool((lens >= 0).all()) and int(cu[-1]) <= total,
                  f"cu_seqlens_{name} must start at 0, not decrease, and end within the {total} tokens")
            _need(int(lens.max()) <= int(mx), f"a segment is longer than max_seqlen_{name}={mx}")
        _need(torch.equal(cu_seqlens_q, cu_seqlens_k), "the stand-in models self-attention (cu_seqlens_q == _k)")
        _need(window_size == (-1, -1), "the stand-in models full (windowless) attention only")
        self.calls["flash_attn_varlen_func"] += 1
        out = torch.zeros_like(q)
        bounds = cu_seqlens_q.tolist()
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                out[a:b] = _sdpa(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
        return out


@contextlib.contextmanager
def strict_fa3() -> Iterator[StrictFA3]:
    """Install the stand-in as `flash_attn_interface` for the duration (train_gpt imports it at resolve time)."""
    fa3 = StrictFA3()
    with mock.patch.dict("sys.modules", {"flash_attn_interface": fa3.module()}):
        yield fa3


# --- CUDA autocast policy --------------------------------------------------------------------------------------------

# Op -> a call of it on one tensor. Keys that name an aten op (overload) get an AutocastCPU kernel when the devices
# disagree; the others ("normalize", "cross_entropy", ...) are composites whose dtype follows from the ops they call.
# Every torch function the model calls is probed here or listed as autocast-neutral in tests/test_cuda_path.py.
PROBES: dict[str, Callable[[Tensor], Tensor]] = {
    "rms_norm": lambda x: F.rms_norm(x, (x.size(-1),)),
    "layer_norm": lambda x: F.layer_norm(x, (x.size(-1),)),
    "softmax.int": lambda x: torch.softmax(x, -1),
    "log_softmax.int": lambda x: torch.log_softmax(x, -1),
    "linalg_vector_norm": lambda x: torch.linalg.vector_norm(x, dim=-1, keepdim=True),
    "pow.Tensor_Scalar": lambda x: x.pow(2),
    "sum": lambda x: x.sum(),
    "sum.dim_IntList": lambda x: x.sum(-1),
    "exp": lambda x: x.exp(),
    "log": lambda x: x.abs().add(1).log(),
    "rsqrt": lambda x: x.abs().add(1).rsqrt(),
    "reciprocal": lambda x: x.abs().add(1).reciprocal(),
    "prod.dim_int": lambda x: x.prod(-1),
    "cumsum": lambda x: x.cumsum(-1),
    "mse_loss": lambda x: F.mse_loss(x, x.detach() * 0),
    "mm": lambda x: x @ x.T,
    "linear": lambda x: F.linear(x, x),
    "mv": lambda x: torch.mv(x, x.diagonal()),
    "square": lambda x: x.square(),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.5),
    "tanh": lambda x: x.tanh(),
    "sigmoid": lambda x: x.sigmoid(),
    "lerp.Tensor": lambda x: torch.lerp(x, x * 2, x.sigmoid()),
    "outer": lambda x: torch.outer(x.diagonal(), x.diagonal()),
    "cat": lambda x: torch.cat((x, x.float())),
    "embedding": lambda x: F.embedding(torch.zeros(3, dtype=torch.long, device=x.device), x),
    "normalize": lambda x: F.normalize(x, dim=-1),
    "cross_entropy": lambda x: F.cross_entropy(x, torch.zeros(8, dtype=torch.long, device=x.device)),
    "repeat_interleave": lambda x: x.repeat_interleave(2, dim=0),
}


def _fake_cuda_dtype(probe: Callable[[Tensor], Tensor], dtype: torch.dtype) -> torch.dtype:
    """The output dtype of probe under CUDA bf16 autocast, from the installed torch's AutocastCUDA kernels. (Modules
    first imported while is_available is patched can half-initialize, hence the imports at the top.)"""
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True), FakeTensorMode():
        x = torch.empty(8, 8, dtype=dtype, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return probe(x).dtype


def _cpu_dtype(probe: Callable[[Tensor], Tensor], dtype: torch.dtype) -> torch.dtype:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return probe(torch.randn(8, 8).to(dtype)).dtype


def cuda_policy() -> dict[str, tuple[torch.dtype, torch.dtype, torch.dtype]]:
    """{op: (input dtype, CUDA autocast output dtype, CPU autocast output dtype)} for every probe and both a bf16 and
    an fp32 input (the first input dtype at which the two devices disagree, else bf16)."""
    out = {}
    for name, probe in PROBES.items():
        rows = [(d, _fake_cuda_dtype(probe, d), _cpu_dtype(probe, d)) for d in (torch.bfloat16, torch.float32)]
        out[name] = next((r for r in rows if r[1] != r[2]), rows[0])
    return out


def _cast_kernel(op: torch._ops.OpOverload, dtype: torch.dtype) -> Callable:
    def kernel(*args: object, **kwargs: object) -> object:
        args, kwargs = tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
                                and t.dtype != torch.float64 else t, (args, kwargs))
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            return op(*args, **kwargs)
    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[dict[str, torch.dtype]]:
    """CPU autocast behaves like CUDA autocast (installed torch) for the probed ops; yields {op: forced dtype}."""
    lib = torch.library.Library("aten", "IMPL")
    forced = {}
    try:
        for name, (_, cuda, cpu) in cuda_policy().items():
            base, _, overload = name.partition(".")
            if cuda != cpu and hasattr(torch.ops.aten, base):
                op = getattr(getattr(torch.ops.aten, base), overload or "default")
                lib.impl(name, _cast_kernel(op, cuda), "AutocastCPU")
                forced[name] = cuda
        yield forced
    finally:
        lib._destroy()
