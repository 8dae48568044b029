"""Strict ±1 weights: every block matrix is sign(w) in the forward pass (issue 16), stored at 1 bit per weight.

Every attention and MLP matrix of every block becomes a SignLinear: its forward uses where(w >= 0, +1, -1) /
sqrt(fan_in) (no learned per-channel scale) with a clipped straight-through estimator, while the latent fp32 weights
stay Muon-trained exactly like train_gpt's block matrices (SignLinear is an nn.Linear, so param_roles is unchanged).
The artifact stores the signs bit-packed (quantization role "sign", PGQ format version 3, quant/lowbit.py), which is
exactly what the forward used: the quantized eval equals the pre-quantization eval up to the fp16 rounding of the
small float passthrough tensors (gains, mixes, gates).

Env vars added to train_gpt's Config:
  PM1_EMBED=1    the tied embedding is sign(E) / sqrt(model_dim) too, in the input lookup and in the output head
                 (logits = h . sign(E)^T / sqrt(d) for the rms-normed final hidden h: unit-variance logits for random
                 signs, at most sqrt(d) before the softcap); stored as "sign" instead of int8 GPTQ.
  PM1_TERNARY=1  block matrices use BitNet b1.58 absmean ternary codes clamp(round(w / mean|w_row|), -1, 1) /
                 sqrt(fan_in) instead of signs, stored as "ternary" (5 trits per byte).
Every block matrix must be larger than PASSTHROUGH_NUMEL (checked), or it would be stored as fp16 instead of codes.

Run: torchrun --standalone --nproc_per_node=2 experiments/pm1.py (same env vars, log, artifact and run_summary.json
as train_gpt.py; e.g. `set -a; . configs/cpu_tiny.env; set +a` first).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import train_gpt

PM1_EPS = 2.0**-24  # floor of the ternary row scale; equals quant's LOWBIT_EPS so the stored codes reload exactly


@dataclass(frozen=True)
class PM1Config(train_gpt.Config):
    pm1_embed: bool = False  # sign(E) / sqrt(d) for the tied embedding and head, stored as sign bits
    pm1_ternary: bool = False  # absmean ternary block matrices instead of signs

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.model_dim
        kv = self.num_kv_heads * (d // self.num_heads)
        smallest = d * min(kv, d, int(self.mlp_mult * d))
        if self.passthrough_numel >= smallest:
            raise ValueError(f"bad config: PASSTHROUGH_NUMEL={self.passthrough_numel} would store block matrices of "
                             f"{smallest} weights as fp16, not as their PM1 codes; use < {smallest}")
        if self.pm1_embed and self.passthrough_numel >= self.vocab_size * d:
            raise ValueError(f"bad config: PM1_EMBED=1 needs PASSTHROUGH_NUMEL < {self.vocab_size * d} (the embedding)")


def pm1_codes(w: Tensor, ternary: bool) -> Tensor:
    """The codes the forward uses, in w's dtype: +1 where w >= 0 else -1 (sign(0) = sign(-0.0) = +1, as quant's
    "sign" role); ternary: BitNet b1.58 absmean (Ma et al. 2024) clamp(round(w / mean|w_row|), -1, 1) in fp32."""
    if not ternary:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    wf = w.float()
    return torch.round(wf / wf.abs().mean(dim=1, keepdim=True).clamp_min(PM1_EPS)).clamp_(-1, 1).to(w.dtype)


class PM1STE(torch.autograd.Function):
    """Forward: pm1_codes(w) / sqrt(fan_in). Backward: the clipped straight-through estimator of BinaryConnect
    (Courbariaux et al. 2015/2016): the gradient of the coded weight passes to w where |w| <= 1 and is 0 elsewhere."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: Tensor, ternary: bool) -> Tensor:
        ctx.save_for_backward(w)
        return pm1_codes(w, ternary) / math.sqrt(w.shape[1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype), None


def pm1_weight(w: Tensor, ternary: bool = False) -> Tensor:
    """The weight a PM1 layer computes with: codes / sqrt(fan_in), clipped STE gradient (PM1STE)."""
    return PM1STE.apply(w, ternary)


class SignLinear(nn.Linear):
    """An nn.Linear whose forward uses pm1_weight(weight): only the signs (or ternary codes) of the latent weight."""

    ternary: bool = False

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, pm1_weight(self.weight, self.ternary).to(x.dtype))


class SignEmbedding(nn.Embedding):
    """The tied embedding as sign(E) / sqrt(model_dim), in the lookup and (PM1GPT.forward_logits) in the head."""

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, pm1_weight(self.weight))


class PM1GPT(train_gpt.GPT):
    """train_gpt's GPT with every block nn.Linear swapped for a SignLinear sharing its weight (and, with PM1_EMBED,
    the tied embedding for a SignEmbedding). The zero-initialised output projections (attention and MLP .proj) get an
    orthogonal init like the other matrices instead: sign(0) = +1 would make each an all-ones (rank-1) matrix."""

    def __init__(self, cfg: PM1Config, fa3: object = None):
        if not isinstance(cfg, PM1Config):
            raise TypeError(f"PM1GPT needs a PM1Config, got {type(cfg).__name__}")
        super().__init__(cfg, fa3)
        for mod in list(self.blocks.modules()):
            for child_name, child in list(mod.named_children()):
                if type(child) is nn.Linear:
                    new = SignLinear(child.in_features, child.out_features, bias=False, device="meta")
                    new.weight, new.ternary = child.weight, cfg.pm1_ternary
                    if child_name == "proj":
                        nn.init.orthogonal_(new.weight)
                    setattr(mod, child_name, new)
        if cfg.pm1_embed:
            emb = SignEmbedding(cfg.vocab_size, cfg.model_dim, device="meta")
            emb.weight = self.tok_emb.weight
            self.tok_emb = emb

    def forward_logits(self, ids: Tensor, lora: train_gpt.TTTAdapters | None = None) -> Tensor:
        if not self.cfg.pm1_embed:
            return super().forward_logits(ids, lora)
        h = self.forward_hidden(ids, lora)
        logits = F.linear(h, pm1_weight(self.tok_emb.weight).to(h.dtype))  # as GPT.forward_logits, signed head
        if lora is not None:
            logits = logits + lora.head(h)
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c)


class PM1Run(train_gpt.Run):
    def log_header(self) -> None:
        """train_gpt's header plus one line: how many weights the forward uses as codes, and of which kind."""
        super().log_header()
        cfg, model = self.cfg, self.model
        coded = [m.weight for m in model.modules() if isinstance(m, (SignLinear, SignEmbedding))]
        n = sum(w.numel() for w in coded)
        total = sum(p.numel() for p in model.parameters())
        self.log(f"pm1 blocks:{'ternary' if cfg.pm1_ternary else 'sign'} embed:{'sign' if cfg.pm1_embed else 'float'} "
                 f"coded_weights:{n} float_weights:{total - n} coded_tensors:{len(coded)}")


def pm1_quant_roles(model: PM1GPT) -> dict[str, str]:
    """train_gpt's quantization roles with every SignLinear weight "sign" (or "ternary") and, with PM1_EMBED, the
    embedding "sign": the artifact stores the codes the forward uses."""
    coded = {f"{name}.weight": ("ternary" if m.ternary else "sign") if isinstance(m, SignLinear) else "sign"
             for name, m in model.named_modules() if isinstance(m, (SignLinear, SignEmbedding))}
    return {**ORIGINAL_QUANT_ROLES(model), **coded}


def pm1_code_sources() -> dict[str, bytes]:
    """train_gpt's code files plus this one (unless packed into the record, where train_gpt is this very file)."""
    files = ORIGINAL_CODE_SOURCES()
    here = Path(__file__).resolve()
    if Path(train_gpt.__file__).resolve() != here:
        files[f"experiments/{here.name}"] = here.read_bytes()
    return files


ORIGINAL_CODE_SOURCES = train_gpt.code_sources
ORIGINAL_QUANT_ROLES = train_gpt.quant_roles
PATCHES = dict(Config=PM1Config, GPT=PM1GPT, Run=PM1Run, quant_roles=pm1_quant_roles, code_sources=pm1_code_sources)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """train_gpt's globals rebound to this experiment's classes and functions; restored on exit."""
    saved = {k: getattr(train_gpt, k) for k in PATCHES}
    try:
        for k, v in PATCHES.items():
            setattr(train_gpt, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(train_gpt, k, v)


def experiment_main() -> None:
    with installed():
        train_gpt.main()


if __name__ == "__main__":
    experiment_main()
