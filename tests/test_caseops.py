"""CaseOps: the case transform, the CaseOps tokenizer and shards, the val byte sidecar, and its audit."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data import builtin_corpus, caseops, shards, sidecar, tokenize_docs
from data.caseops import ALLCAPS, CAPNEXT, ESC, SENTINEL, TITLE
from data.shards import write_shard
from tools import bpb_audit

ROOT = Path(__file__).resolve().parent.parent
U2581 = "\u2581"

# -----------------------------------------------------------------------------
# the transform
# -----------------------------------------------------------------------------

ENCODINGS = [  # (text, its encoding): one row per rule, the expected strings written out by hand
    ("golf", "golf"),
    ("Golf", TITLE + "golf"),
    ("NASA", ALLCAPS + "nasa"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("ABc", TITLE + "a" + CAPNEXT + "bc"),
    ("aBC", "a" + CAPNEXT + "b" + CAPNEXT + "c"),
    ("A I x", f"{TITLE}a {TITLE}i x"),  # one capital letter is TITLE, not ALLCAPS
    ("OK", ALLCAPS + "ok"),
    ("R2D2 x86 COVID19", f"{TITLE}r2{TITLE}d2 x86 {ALLCAPS}covid19"),  # digits end an ASCII word
    ("Ünïcödé École ÉCOLE Straße", f"Ünïcödé École É{ALLCAPS}cole {TITLE}straße"),  # non-ASCII letters untouched
    ("x\ue001Y", f"x{ESC}\ue001{TITLE}y"),  # an operator character already in the text is escaped
    (ESC + TITLE, ESC + ESC + ESC + TITLE),
    (SENTINEL + "Ab" + SENTINEL, f"{SENTINEL}{TITLE}ab{SENTINEL}"),  # the sentinel is not an operator here
    ("", ""),
    ("12,345.67 + 8 = ?\n\t", "12,345.67 + 8 = ?\n\t"),
]


@pytest.mark.parametrize("text,encoded", ENCODINGS)
def test_encode_examples_and_round_trip(text: str, encoded: str) -> None:
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text
    assert caseops.original_utf8_len(encoded) == len(text.encode("utf-8"))


HOSTILE = "aAbBzZqQ  \n\t\r.,'-19é\u00c9ßΣ😀日\u2581\x00" + TITLE + ALLCAPS + CAPNEXT + ESC + SENTINEL


def _random_strings(n: int, alphabet: str, seed: int, max_len: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def test_round_trip_property_over_random_strings() -> None:
    for s in _random_strings(20_000, HOSTILE, seed=1):
        e = caseops.encode(s)
        assert caseops.decode(e) == s, repr(s)
        assert not any("A" <= c <= "Z" for c in e), repr(s)  # all capitals became operators
        assert caseops.original_utf8_len(e) == len(s.encode("utf-8")), repr(s)


def test_decode_accepts_exactly_the_encodings() -> None:
    # Random operator-heavy strings: decode either refuses them or returns the one text they encode.
    accepted = 0
    for t in _random_strings(20_000, "ab Ab" + TITLE + ALLCAPS + CAPNEXT + ESC, seed=2, max_len=8):
        try:
            s = caseops.decode(t)
        except caseops.CaseOpsError:
            continue
        accepted += 1
        assert caseops.encode(s) == t, repr(t)
    assert 1_000 < accepted < 19_000  # both outcomes exercised


@pytest.mark.parametrize("bad,needle", [
    (TITLE, "position 0: TITLE operator (U+E001) not followed by an ASCII letter"),
    ("ab" + CAPNEXT + " ", "position 2: CAPNEXT operator (U+E003) not followed by an ASCII letter"),
    ("x" + ESC, "position 1: ESC operator (U+E004) not followed by a character"),
    ("Abc", "position 0: not CaseOps text"),  # a capital letter is never in an encoding
    (ESC + "x", "position 0: not CaseOps text"),  # ESC only escapes operators
    (TITLE + "a" + CAPNEXT + "b", "position 0: not CaseOps text"),  # "AB" is written ALLCAPS ab
    ("ab" + TITLE + "c", "position 2: not CaseOps text"),  # TITLE inside a word
    (ALLCAPS + "a", "position 0: not CaseOps text"),  # ALLCAPS needs two letters
])
def test_decode_rejects_malformed_text(bad: str, needle: str) -> None:
    with pytest.raises(caseops.CaseOpsError, match=re.escape(needle)):
        caseops.decode(bad)


def test_operator_byte_offsets_skip_escaped_characters() -> None:
    text = f"{TITLE}ab {ESC}{TITLE}x {ESC}{ESC}{CAPNEXT}"  # CAPNEXT at the end is malformed but still an operator
    data = text.encode("utf-8")
    assert caseops.operator_byte_offsets(data).tolist() == [0, 6, 14, 20]  # TITLE, ESC, ESC, CAPNEXT


def _cli(mode: str, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data" / "caseops.py"), mode], input=data,
                          capture_output=True, timeout=60)


def test_cli_round_trip_is_byte_exact() -> None:
    text = "The NASA file\r\nüber ÉCOLE " + TITLE + SENTINEL + "\n\nMcDonald's iPhone without a final newline"
    enc = _cli("encode", text.encode("utf-8"))
    assert enc.returncode == 0 and enc.stdout == caseops.encode(text).encode("utf-8")
    dec = _cli("decode", enc.stdout)
    assert dec.returncode == 0 and dec.stdout == text.encode("utf-8")


@pytest.mark.parametrize("mode,data,needle,rc", [
    ("decode", b"fine\nBad\n", "error: line 2: position 0: not CaseOps text", 1),
    ("encode", b"ok\n\xff\xfe\n", "error: line 2: input is not UTF-8", 1),
    ("upper", b"", "usage: python data/caseops.py encode|decode", 2),
])
def test_cli_errors_are_one_line(mode: str, data: bytes, needle: str, rc: int) -> None:
    proc = _cli(mode, data)
    err = proc.stderr.decode()
    assert proc.returncode == rc and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# -----------------------------------------------------------------------------
# CaseOps tokenizer, shards and sidecar
# -----------------------------------------------------------------------------

CASE_DOCS = [  # val docs: every rule of the transform and every hard case of the byte attribution
    "The NASA Launch of iPhone 15 by McDonald's CEO, A.I. and HTTPServer at 3:45PM.",
    "Le Café À Paris: ÉCOLE École naïve ÆSIR Straße ΑΒΓ, ünïcödé 😀🎉 日本語 and the ﬁ ligature ½.",
    f"Operators already here: {TITLE}{ALLCAPS}{CAPNEXT}{ESC} and the sentinel {SENTINEL}, Esc{ESC}X.",
    "  leading spaces, tabs\tand\r\nCRLF lines,   runs of spaces, a NUL\x00 and trailing  \n\n",
    f"A literal {U2581} block char (U+2581) twice: {U2581}{U2581} Word.",
    "ALL CAPS SHOUTING DOC WITH DIGITS 12345 AND X Y Z single letters I a A.",
]


def _train_docs() -> list[str]:
    docs, total = [], 0
    for d in builtin_corpus.pydoc_docs():
        docs.append(d)
        total += len(d.encode("utf-8"))
        if total >= 150_000:
            break
    return docs + ["Le Café À Paris, École, naïve façade, ÆSIR, Straße."] * 20 + ["日本 東京"] * 5


def _write_docs(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def caseops_ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A CaseOps dataset: the hostile CASE_DOCS as val, 80-token shards so val spans several shards."""
    root = tmp_path_factory.mktemp("caseops_ds")
    val = CASE_DOCS
    docs = _write_docs(root / "docs.jsonl", val + _train_docs())
    rc = tokenize_docs.main(["--docs", str(docs), "--vocab-size", "400", "--num-val-docs", str(len(val)),
                             "--out", str(root / "ds"), "--tokenizer-out", str(root / "tok"), "--shard-tokens", "80",
                             "--caseops"])
    assert rc == 0
    return root / "ds", root / "tok.model", {"val": val}


@pytest.fixture(scope="module")
def caseops_sp(caseops_ds) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(caseops_ds[1]))


def test_operators_are_whole_pieces_with_fixed_ids(caseops_sp) -> None:
    sp = caseops_sp
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", TITLE, ALLCAPS, CAPNEXT, ESC]
    text = caseops.encode(f"The NASA iPhone {TITLE}{ESC}")
    ids = sp.encode(text)
    assert [i for i in ids if i in range(4, 8)] == [4, 5, 6, 7, 4, 7, 7]  # never split, never byte-fallen-back
    assert sp.piece_to_id("\u2581") != sp.unk_id()  # shards.build_byte_luts still works on this tokenizer


def test_caseops_tokenizer_reproduces_the_encoded_text(caseops_sp) -> None:
    # identity normalization, whitespace kept: the tokens decode to exactly what they encode (U+2581 aside)
    for doc in CASE_DOCS + _random_strings(2_000, HOSTILE, seed=3):
        enc = caseops.encode(doc)
        assert caseops_sp.decode(caseops_sp.encode(enc)) == enc.replace(U2581, " "), repr(doc)


def test_sidecar_sums_to_the_original_bytes_of_every_doc(caseops_sp) -> None:
    piece_bytes = sidecar.decoded_piece_bytes(caseops_sp)
    for doc in CASE_DOCS + _random_strings(2_000, HOSTILE, seed=4):
        enc = caseops.encode(doc)
        counts = sidecar.token_original_bytes(enc, caseops_sp.encode(enc), caseops_sp, piece_bytes)
        assert int(counts.sum()) == len(doc.encode("utf-8")), repr(doc)


def test_sidecar_attribution_rule_token_by_token(caseops_sp) -> None:
    sp = caseops_sp
    piece_bytes = sidecar.decoded_piece_bytes(sp)
    doc = f"NASA is{TITLE}😀 a{U2581}b"
    enc = caseops.encode(doc)  # ALLCAPS "nasa is" ESC TITLE "😀 a▁b"
    ids = np.array(sp.encode(enc))
    counts = sidecar.token_original_bytes(enc, ids, sp, piece_bytes)
    pieces = [sp.id_to_piece(int(i)) for i in ids]
    esc, title, space_x = pieces.index(ESC), pieces.index(TITLE), pieces.index("\u2581is")
    assert pieces[0] == ALLCAPS and counts[0] == 0 and counts[esc] == 0  # operators: 0 (they are 3 bytes of text)
    assert title == esc + 1 and counts[title] == 3  # an escaped operator character is literal text: its 3 bytes
    assert counts[1:space_x].sum() == 4  # the lowercased "nasa": one byte per letter, like "NASA"
    assert counts[space_x] == 3  # '▁is': the space, i and s
    byte_pieces = [k for k, p in enumerate(pieces) if p.startswith("<0x")]
    assert len(byte_pieces) == 4 and counts[byte_pieces].tolist() == [1, 1, 1, 1]  # the emoji: 1 per byte piece
    extra = counts - piece_bytes[ids]  # vs the decoded text: only the literal U+2581 differs, +2 on its '▁' piece
    (k,) = np.flatnonzero(extra[title + 1:]) + title + 1
    assert extra[k] == 2 and U2581 in pieces[k]
    assert counts.sum() == len(doc.encode("utf-8"))


def test_a_normalizing_tokenizer_cannot_get_a_sidecar(tmp_path: Path) -> None:
    model = tokenize_docs.train_tokenizer(_train_docs(), 400, tmp_path / "nfkc")  # plain: nmt_nfkc
    sp = spm.SentencePieceProcessor(model_file=str(model))
    enc = caseops.encode("The ﬁ ligature")
    with pytest.raises(sidecar.SidecarError, match="the tokenizer normalizes text"):
        sidecar.token_original_bytes(enc, sp.encode(enc), sp, sidecar.decoded_piece_bytes(sp))


def test_caseops_export_layout(caseops_ds, caseops_sp) -> None:
    ds, tok, info = caseops_ds
    m = json.loads((ds / "manifest.json").read_text())
    assert (m["caseops"], m["text_transform"], m["byte_sidecar"]) == (True, "caseops_v1", "fineweb_val_bytes_*.bin")
    assert m["operator_ids"] == {"TITLE": 4, "ALLCAPS": 5, "CAPNEXT": 6, "ESC": 7}
    assert m["tokenizer_sha256"] == tokenize_docs.file_sha256(tok)
    val = m["splits"]["val"]
    vals = sidecar.val_token_files(ds)
    sides = sidecar.sidecar_files(ds)
    assert len(vals) == len(sides) == len(val["files"]) == len(val["sidecar_files"]) > 2  # the same split, shard by shard
    for v, s, fv, fs in zip(vals, sides, val["files"], val["sidecar_files"], strict=True):
        assert s.name == sidecar.sidecar_name(v.name) == fs["name"] and v.name == fv["name"]
        assert shards.read_shard_header(v) == shards.read_shard_header(s) == fv["tokens"] == fs["tokens"]
        assert fs["sha256"] == tokenize_docs.file_sha256(s)
    tokens = np.concatenate([shards.load_shard(v) for v in vals]).astype(np.int64)
    counts = np.concatenate([shards.load_shard(s) for s in sides]).astype(np.int64)
    expected = np.concatenate([[1] + caseops_sp.encode(caseops.encode(t)) for t in info["val"]])
    np.testing.assert_array_equal(tokens, expected)  # BOS=1 at the start of every doc
    bos = np.flatnonzero(tokens == shards.BOS_ID)
    assert bos.size == len(info["val"]) and not counts[bos].any()
    ops = np.isin(tokens, [4, 5, 6, 7])  # operators 0; the 5 operator characters escaped in the text 3 each
    assert set(counts[ops].tolist()) == {0, 3} and counts[ops].sum() == 3 * 5
    per_doc = np.add.reduceat(counts, bos)
    assert per_doc.tolist() == [len(t.encode("utf-8")) for t in info["val"]]
    assert val["sidecar_bytes"] == val["bytes"] == int(counts.sum())
    assert val["u2581_chars"] == 3
    train = np.concatenate([shards.load_shard(ds / f["name"]) for f in m["splits"]["train"]["files"]])
    assert train[0] == shards.BOS_ID and not list(ds.glob("fineweb_train_bytes_*"))


# -----------------------------------------------------------------------------
# the sidecar audit, and the wrong sidecars it exists to catch
# -----------------------------------------------------------------------------

def _copy_ds(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    m = json.loads((dst / "manifest.json").read_text())
    m["tokenizer"] = str((src / m["tokenizer"]).resolve())
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _sidecar(ds: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    files = sidecar.sidecar_files(ds)
    tokens = np.concatenate([shards.load_shard(v) for v in sidecar.val_token_files(ds)]).astype(np.int64)
    return files, tokens, np.concatenate([shards.load_shard(f) for f in files]).astype(np.int64)


def _write_sidecar(files: list[Path], counts: np.ndarray) -> None:
    pos = 0
    for f in files:
        n = shards.read_shard_header(f)
        write_shard(f, counts[pos:pos + n])
        pos += n


def _audit(ds: Path, tok: Path, seq_len: int) -> sidecar.SidecarAudit:
    sp, manifest = bpb_audit.load_inputs(ds, tok)
    return sidecar.audit_sidecar(ds, sp, seq_len, manifest=manifest)


SEQ = 64  # the val stream is cut inside a doc at this seq_len


def test_audit_passes_the_caseops_dataset(caseops_ds, capsys) -> None:
    ds, tok, info = caseops_ds
    r = _audit(ds, tok, SEQ)
    assert r.passed and r.transform == "caseops_v1" and not r.problems and r.bad_docs == 0
    assert r.docs == len(info["val"]) and r.sidecar_bytes == sum(len(t.encode()) for t in info["val"])
    assert r.decoded_bytes + r.u2581_bytes == r.sidecar_bytes and r.u2581_bytes == 6 and 2 <= r.u2581_tokens <= 3
    _, tokens, counts = _sidecar(ds)
    usable = (tokens.size - 1) // SEQ * SEQ
    assert r.scored_tokens == usable and r.scored_sidecar == int(counts[1:usable + 1].sum())
    assert r.cut_doc is not None and r.scored_decoded == r.scored_sidecar
    assert bpb_audit.main(["--data-dir", str(ds), "--tokenizer", str(tok), "--seq-len", str(SEQ)]) == 0
    out = capsys.readouterr().out
    assert "transform caseops_v1" in out and "tokens, +6 bytes" in out and "\nPASS: sidecar" in out


def _model(ds: Path) -> str:
    return str((ds / json.loads((ds / "manifest.json").read_text())["tokenizer"]).resolve())


def _corrupt(kind: str, files: list[Path], tokens: np.ndarray, counts: np.ndarray, ds: Path, seq: int) -> str:
    """Apply one defect to a copied dataset; return the text the audit report must show."""
    sp = spm.SentencePieceProcessor(model_file=_model(ds))
    bos = np.flatnonzero(tokens == shards.BOS_ID)
    ordinary = next(i for i in range(bos[1] + 1, tokens.size) if counts[i] == 1 and tokens[i] > 7)
    usable = (tokens.size - 1) // seq * seq
    if kind == "plus_one":
        counts[ordinary] += 1
        return "MISMATCH doc 1: sidecar"
    if kind == "moved_between_docs":  # totals unchanged: only the per-doc proof sees it
        counts[ordinary] -= 1
        counts[bos[2] + 1] += 1
        return "MISMATCH doc 1"
    if kind == "moved_across_the_cut":  # every doc sum unchanged: only the scored-range check sees it
        cut = int(bos[np.searchsorted(bos, usable, side="right") - 1])
        i = next(i for i in range(cut + 1, usable + 1) if counts[i] > 0)
        j = next(j for j in range(usable + 1, tokens.size) if tokens[j] != shards.BOS_ID)
        counts[i] -= 1
        counts[j] += 1
        return "FAIL: sidecar"
    if kind == "fake_u2581":  # +2 on a space piece looks like a U+2581; the manifest's count exposes it
        space = next(i for i in range(1, tokens.size) if U2581 in sp.id_to_piece(int(tokens[i])) and counts[i] == 1)
        counts[space] += 2
        m = json.loads((ds / "manifest.json").read_text())
        m["splits"]["val"]["bytes"] += 2  # even with the byte total made to agree
        (ds / "manifest.json").write_text(json.dumps(m))
        return "literal U+2581 in val docs (manifest.json) 3 vs U+2581 term 4"
    if kind == "decoded_not_original":  # bytes of the decoded text (U+2581 as 1): only the raw doc bytes tell
        piece_bytes = sidecar.decoded_piece_bytes(sp)
        for b, e in zip(bos, np.append(bos[1:], tokens.size), strict=True):
            counts[b + 1:e] = sidecar.token_original_bytes(sp.decode(tokens[b + 1:e].tolist()), tokens[b + 1:e], sp,
                                                           piece_bytes)
        m = json.loads((ds / "manifest.json").read_text())
        del m["splits"]["val"]["u2581_chars"]
        (ds / "manifest.json").write_text(json.dumps(m))
        return f"original val doc bytes (manifest.json) {m['splits']['val']['bytes']:,} != sidecar bytes"
    if kind == "bos_bytes":
        counts[bos[1]] += 1
        return "BOS positions have nonzero sidecar bytes (first at val position"
    if kind == "shifted":  # one entry lost: the sidecar no longer lines up with its shard
        write_shard(files[0], counts[1:shards.read_shard_header(files[0])])
        return "entries but fineweb_val_000000.bin has"
    if kind == "missing_file":
        files[-1].unlink()
        return f"{sidecar.sidecar_name(sidecar.val_token_files(ds)[-1].name)}"
    if kind == "bosless":  # upstream's published bug: CaseOps shards written without BOS
        keep = tokens != shards.BOS_ID
        v0 = sidecar.val_token_files(ds)
        for f in v0 + files:
            f.unlink()
        write_shard(ds / "fineweb_val_000000.bin", tokens[keep])
        write_shard(ds / "fineweb_val_bytes_000000.bin", counts[keep])
        return "the val stream does not start with BOS"
    raise AssertionError(kind)



@pytest.mark.parametrize("kind", ["plus_one", "moved_between_docs", "moved_across_the_cut", "fake_u2581",
                                  "decoded_not_original", "bos_bytes", "shifted", "missing_file", "bosless"])
def test_audit_catches_a_wrong_sidecar(caseops_ds, tmp_path: Path, capsys, kind: str) -> None:
    ds = _copy_ds(caseops_ds[0], tmp_path / "ds")
    tok = caseops_ds[1]
    files, tokens, counts = _sidecar(ds)
    needle = _corrupt(kind, files, tokens, counts, ds, SEQ)
    if kind not in ("shifted", "missing_file", "bosless"):
        _write_sidecar(files, counts)
    assert bpb_audit.main(["--data-dir", str(ds), "--tokenizer", str(tok), "--seq-len", str(SEQ)]) == 1
    out = capsys.readouterr().out
    assert needle in out and "PASS" not in out, out
    if kind == "moved_across_the_cut":
        r = _audit(ds, tok, SEQ)
        assert r.bad_docs == 0 and r.sidecar_bytes == r.decoded_bytes + r.u2581_bytes
        assert r.scored_sidecar == r.scored_decoded - 1


def test_audit_refuses_another_tokenizer(caseops_ds, tmp_path: Path, capsys) -> None:
    ds, tok, _ = caseops_ds
    # the failure issue 12 saw: another tokenizer with the same vocab size, accepted silently and scored wrongly
    other = tokenize_docs.train_tokenizer(_train_docs()[5:], 400, tmp_path / "other", caseops_mode=True)
    assert spm.SentencePieceProcessor(model_file=str(other)).vocab_size() == 400
    other_sha, want = tokenize_docs.file_sha256(other), tokenize_docs.file_sha256(tok)
    assert bpb_audit.main(["--data-dir", str(ds), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and other_sha in err and want in err and err.startswith("error: ")


def test_identity_sidecar_and_unknown_transform(caseops_ds, tmp_path: Path) -> None:
    ds = _copy_ds(caseops_ds[0], tmp_path / "ds")
    sp = spm.SentencePieceProcessor(model_file=str(caseops_ds[1]))
    with pytest.raises(ValueError, match="unknown text transform 'rot13'"):
        sidecar.audit_sidecar(ds, sp, SEQ, transform="rot13")
    r = sidecar.audit_sidecar(ds, sp, SEQ, transform="identity")  # the wrong inverse: capitals would be missing
    assert not r.passed and r.bad_docs > 0


# -----------------------------------------------------------------------------
# the builtin corpus, CaseOps variant
# -----------------------------------------------------------------------------

def test_builtin_caseops_dataset_builds_offline_and_passes_the_audit(tmp_path: Path, capsys) -> None:
    build = dict(vocab_size=400, num_val_docs=4, source="pydoc")  # the offline source: no network at all
    ds, model = builtin_corpus.ensure_builtin_dataset(tmp_path, **build, caseops=True)
    assert ds == tmp_path / "datasets" / "builtin_caseops_sp400"
    assert model == tmp_path / "tokenizers" / "builtin_caseops_400_bpe.model"
    assert [p.name for p in sidecar.sidecar_files(ds)] == ["fineweb_val_bytes_000000.bin"]
    m = json.loads((ds / "manifest.json").read_text())
    assert m["caseops"] and m["tokenizer_trained_on"] == "train" and m["splits"]["val"]["docs"] == 4
    plain, _ = builtin_corpus.ensure_builtin_dataset(tmp_path, **build)
    assert plain != ds and not sidecar.sidecar_files(plain)  # the plain variant is separate and unchanged
    capsys.readouterr()
    builtin_corpus.ensure_builtin_dataset(tmp_path, **build, caseops=True)
    assert "up to date" in capsys.readouterr().out
    (ds / "fineweb_val_bytes_000000.bin").write_bytes(b"")  # a damaged sidecar is rebuilt, not trusted
    builtin_corpus.ensure_builtin_dataset(tmp_path, **build, caseops=True)
    assert "up to date" not in capsys.readouterr().out
    assert bpb_audit.main(["--data-dir", str(ds), "--tokenizer", str(model), "--seq-len", "256"]) == 0
    assert "PASS: sidecar" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# a whole tiny run on the builtin CaseOps dataset: record N's eval and quantization, then the referees
# -----------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_caseops_run_with_phased_ttt_lqer_int7_passes_legality_and_audit(tmp_path: Path, capsys) -> None:
    from conftest import TINY_TRAIN

    import train_gpt
    from quant import load_artifact
    from tools import check_legality

    ds, model = builtin_corpus.ensure_builtin_dataset(tmp_path, vocab_size=512, num_val_docs=16, source="pydoc",
                                                      caseops=True)
    out = tmp_path / "run"
    cfg = train_gpt.Config(**{**TINY_TRAIN, "ttt_chunk_size": 32}, data_path=str(ds), tokenizer_path=str(model),
                           out_dir=str(out), run_id="caseops", seed=5)
    assert cfg.ttt_enabled and cfg.lqer_enabled and cfg.embed_bits == 7  # record N's defaults, nothing switched on
    summary = train_gpt.run(cfg, train_gpt.Runtime())
    assert summary["final_label"] == "quantized_ttt_phased" and "quantized_sliding_window" in summary["evals"]
    ttt = summary["evals"]["quantized_ttt_phased"]["val_bpb"]
    assert 0 < ttt < summary["evals"]["quantized_sliding_window"]["val_bpb"]  # the TTT gains even at this size
    qts = {qt.name: qt for qt in load_artifact(out / "final_model.int6.ptz")}
    assert qts["tok_emb.weight"].bits == 7 and sum(qt.lqer is not None for qt in qts.values()) == 3
    # the trainer counted bytes from the sidecar, and the audit's independent decode agrees with that sidecar
    log = (out / "logs" / "caseops.txt").read_text()
    total = int(re.search(r"^val_bytes: source:sidecar total:(\d+)$", log, re.M).group(1))
    capsys.readouterr()
    assert bpb_audit.main(["--data-dir", str(ds), "--tokenizer", str(model), "--seq-len", str(cfg.eval_seq_len)]) == 0
    assert "PASS: sidecar" in capsys.readouterr().out
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sidecar.audit_sidecar(ds, sp, cfg.eval_seq_len).scored_sidecar == total > 0
    # the phased TTT on this artifact, with the run's own config (run_summary.json beside the artifact)
    assert check_legality.main(["--artifact", str(out / "final_model.int6.ptz"), "--data-dir", str(ds),
                                "--tokenizer", str(model), "--mode", "ttt"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("PASS: all"), "\n".join(lines)
