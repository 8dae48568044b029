"""CaseOps: a lossless case transform applied to text before SentencePiece (record N's tokenizer, PR #1729).

    python data/caseops.py encode < text.txt > text.caseops
    python data/caseops.py decode < text.caseops > text.txt

Every maximal run of ASCII letters is written in lowercase and its capitalization becomes private-use operator
characters in front of the letters they affect (docs/data.md has the full description):

    lowercase word   unchanged                       "golf"   -> "golf"
    TITLE  U+E001    first letter upper, rest lower   "Golf"   -> TITLE "golf";  "A" -> TITLE "a"
    ALLCAPS U+E002   two or more letters, all upper   "NASA"   -> ALLCAPS "nasa"
    CAPNEXT U+E003   mixed case: the next letter is   "iPhone" -> "i" CAPNEXT "phone"
                     upper (TITLE still marks an      "McDonald" -> TITLE "mc" CAPNEXT "donald"
                     upper first letter)
    ESC    U+E004    an operator character already in the text is kept as ESC + that character

U+E000 (SENTINEL) is reserved by the CaseOps family but is not an operator of this version: it passes through like any
other character. Non-ASCII letters are never touched (they end an ASCII word). The output is byte-for-byte the
upstream `lossless_caps_caseops_v1` transform, so a tokenizer trained upstream sees the same text.

encode and decode are exact inverses: decode(encode(s)) == s for every string s, and decode accepts only encode's
outputs (anything else raises CaseOpsError), so encode(decode(t)) == t whenever decode returns.
"""

from __future__ import annotations

import re
import sys

import numpy as np

SENTINEL, TITLE, ALLCAPS, CAPNEXT, ESC = "\ue000", "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # in this order they become the tokenizer's pieces 4..7
OPERATOR_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}
TRANSFORM_NAME = "caseops_v1"  # upstream: lossless_caps_caseops_v1

# A maximal ASCII-letter run holding at least one capital (the lookbehind pins the match to the run's start, so a
# long lowercase run costs one linear scan), or an operator character that must be escaped.
_ENCODE_RE = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
# Decoding: ESC + any char; ALLCAPS + a letter run (CAPNEXT inside is tolerated here and rejected by the re-encode
# check); TITLE or CAPNEXT + one letter; any other operator character is misplaced.
_DECODE_RE = re.compile(r"\ue004(.)|\ue002((?:\ue003?[A-Za-z])+)|[\ue001\ue003]([A-Za-z])|([\ue001-\ue004])", re.S)
# The UTF-8 encodings of U+E001..U+E004: EE 80 81..84.
_OPERATOR_BYTES_RE = re.compile(rb"\xee\x80[\x81-\x84]")
_ESC_BYTES = ESC.encode("utf-8")


class CaseOpsError(ValueError):
    """Text that encode() cannot have produced; the message gives the character position."""


def _encode_match(m: re.Match[str]) -> str:
    word = m.group()
    if word in OPERATORS:
        return ESC + word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[1:].islower() or len(word) == 1:  # the match holds a capital, so here it is the first letter
        return TITLE + lower
    out = [TITLE if word[0].isupper() else "", lower[0]]
    out += [CAPNEXT + lo if ch.isupper() else lo for ch, lo in zip(word[1:], lower[1:], strict=True)]
    return "".join(out)


def encode(text: str) -> str:
    """Lowercase every ASCII word and put its capitalization into operator characters (see the module docstring)."""
    return _ENCODE_RE.sub(_encode_match, text)


def _decode_match(m: re.Match[str]) -> str:
    escaped, caps_run, capital, stray = m.groups()
    if escaped is not None:
        return escaped
    if caps_run is not None:
        return caps_run.replace(CAPNEXT, "").upper()
    if capital is not None:
        return capital.upper()
    raise CaseOpsError(f"position {m.start()}: {OPERATOR_NAMES[stray]} operator (U+{ord(stray):04X}) "
                       f"not followed by {'a character' if stray == ESC else 'an ASCII letter'}")


def decode(text: str) -> str:
    """Inverse of encode. Raises CaseOpsError on text encode() cannot produce (a misplaced or dangling operator,
    a capital letter, an ESC before an ordinary character, a non-canonical marking such as TITLE on a word whose
    second letter is marked too)."""
    out = _DECODE_RE.sub(_decode_match, text)
    if (again := encode(out)) != text:  # canonical form: the one encoding of `out`
        i = first_difference(again, text)
        raise CaseOpsError(f"position {i}: not CaseOps text ({text[max(0, i - 10):i + 10]!r} is not how encode "
                           f"writes {out[max(0, i - 10):i + 10]!r})")
    return out


def first_difference(a: str, b: str) -> int:
    """Index of the first character where a and b differ (the shorter length if one is a prefix of the other)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def operator_byte_offsets(data: bytes) -> np.ndarray:
    """Byte offsets (int64) of the characters of UTF-8 CaseOps text that act as operators: every TITLE, ALLCAPS,
    CAPNEXT and ESC except a character escaped by the ESC right before it, which is literal text."""
    offsets, literal_at = [], -1
    for m in _OPERATOR_BYTES_RE.finditer(data):
        if m.start() == literal_at:
            continue
        offsets.append(m.start())
        if m.group() == _ESC_BYTES:
            literal_at = m.end()
    return np.array(offsets, dtype=np.int64)


def original_utf8_len(encoded: str) -> int:
    """UTF-8 bytes of decode(encoded), computed without decoding: the transform only changes ASCII case (one byte
    either way) and adds 3-byte operator characters."""
    data = encoded.encode("utf-8")
    return len(data) - 3 * operator_byte_offsets(data).size


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ("encode", "decode"):
        print("usage: python data/caseops.py encode|decode  (UTF-8 text on stdin, result on stdout)", file=sys.stderr)
        return 2
    fn = encode if args[0] == "encode" else decode
    # Line by line is exact: an ASCII word never spans a newline, encode never emits an operator before one, and
    # lines are split on b"\n" only, so "\r\n" and a missing final newline survive untouched.
    for lineno, line in enumerate(sys.stdin.buffer, 1):
        try:
            sys.stdout.buffer.write(fn(line.decode("utf-8")).encode("utf-8"))
        except UnicodeDecodeError as e:
            print(f"error: line {lineno}: input is not UTF-8 (byte {e.start}: {e.reason})", file=sys.stderr)
            return 1
        except CaseOpsError as e:
            print(f"error: line {lineno}: {e}", file=sys.stderr)
            return 1
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
