"""pgolf quantization: SDClip + GPTQ codes, sign / ternary codes, and the versioned PGQ artifact container.

A flat package that tools/build_record.py inlines into the packed train_gpt.py: stdlib, numpy, torch, brotli and
zstandard only; no module-level state. `python -m quant inspect ARTIFACT` explains an artifact's bytes.
"""

from quant.codec import (
    ARTIFACT_CODECS,
    ARTIFACT_VERSION,
    ARTIFACT_VERSIONS,
    ArtifactError,
    compress_bytes,
    compress_payload,
    decode_artifact,
    decompress_bytes,
    encode_artifact,
    load_artifact,
    parse_artifact,
    read_artifact_file,
    save_artifact,
    stored_codes,
)
from quant.gptq import (
    LOWBIT_ROLES,
    ROLES,
    QTensor,
    accumulate_hessian,
    dequantize,
    describe,
    gptq_quantize_weight,
    quantize_state_dict,
)
from quant.lowbit import LOWBIT_EPS, absmean_scale, sign_quantize, ternary_codes, ternary_quantize
from quant.lqer import LQERFactors, lqer_correction, lqer_factors
from quant.pack import byte_shuffle, byte_unshuffle, pack_signs, pack_trits, packed_len, unpack_signs, unpack_trits
from quant.sdclip import quantize_rtn, sdclip_scale

__all__ = [
    "ARTIFACT_CODECS",
    "ARTIFACT_VERSION",
    "ARTIFACT_VERSIONS",
    "LOWBIT_EPS",
    "LOWBIT_ROLES",
    "ROLES",
    "ArtifactError",
    "LQERFactors",
    "QTensor",
    "absmean_scale",
    "accumulate_hessian",
    "byte_shuffle",
    "byte_unshuffle",
    "compress_bytes",
    "compress_payload",
    "decode_artifact",
    "decompress_bytes",
    "dequantize",
    "describe",
    "encode_artifact",
    "gptq_quantize_weight",
    "load_artifact",
    "lqer_correction",
    "lqer_factors",
    "pack_signs",
    "pack_trits",
    "packed_len",
    "parse_artifact",
    "quantize_rtn",
    "quantize_state_dict",
    "read_artifact_file",
    "save_artifact",
    "sdclip_scale",
    "sign_quantize",
    "stored_codes",
    "ternary_codes",
    "ternary_quantize",
    "unpack_signs",
    "unpack_trits",
]
