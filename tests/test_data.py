"""Data pipeline: shard format, tokenizer/shard export, builtin corpus, and the independent bpb byte audit."""

from __future__ import annotations

import bz2
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data import builtin_corpus, shards, tokenize_docs
from data.shards import write_shard
from tools import bpb_audit

# Text with multi-byte characters the tokenizer learns (é, ü), characters it never sees in training (emoji,
# Fraktur, CJK beyond the few trained ones) so they fall back to bytes, NFKC-changed characters (ﬁ, ½, 𝔘) and digits.
VAL_DOCS = [
    "Le café est très bon. Résumé: naïve façade, 12345 euros le kilo.",
    "日本の首都は東京です。 Tokyo has 13960000 people and 23 special wards.",
    "Emoji time 😀🎉 and a rare glyph 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 plus the ﬁ ligature and ½ a cup.",
    "Tabs\tand  double  spaces\n\nthen a new paragraph über alles, Ångström, Łódź.",
    "Ending on a character cut by the val truncation: the party was great 😀",
]
WIDE_TRAIN = ["Le café est très bon, résumé naïve über façade."] * 30 + ["日本 東京 首都"] * 5


def _pydoc_text(max_bytes: int) -> list[str]:
    docs, total = [], 0
    for d in builtin_corpus.pydoc_docs():
        docs.append(d)
        total += len(d.encode("utf-8"))
        if total >= max_bytes:
            return docs
    return docs


def _write_docs(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_sp(tmp_path_factory: pytest.TempPathFactory) -> spm.SentencePieceProcessor:
    prefix = tmp_path_factory.mktemp("sp") / "small"
    model = tokenize_docs.train_tokenizer(_pydoc_text(150_000) + WIDE_TRAIN, 384, prefix)
    return spm.SentencePieceProcessor(model_file=str(model))


# -----------------------------------------------------------------------------
# shard format (data/shards.py: the one implementation)
# -----------------------------------------------------------------------------

def test_shard_round_trip(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 2**16, size=10_001).astype(np.uint16)
    tokens[:2] = (0, 65535)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == shards.SHARD_HEADER_BYTES + 2 * tokens.size
    assert shards.read_shard_header(path) == tokens.size
    np.testing.assert_array_equal(shards.load_shard(path), tokens)
    np.testing.assert_array_equal(shards.load_shard(path, mmap=True), tokens)
    assert not list(tmp_path.glob("*.tmp"))


def _corrupt(path: Path, kind: str) -> None:
    raw = bytearray(path.read_bytes())
    if kind == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif kind == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif kind == "truncated":
        raw = raw[:-3]
    elif kind == "extra":
        raw += b"\0\0"
    elif kind == "short_header":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind,needle", [("magic", "bad magic"), ("version", "version 7"), ("truncated", "truncated"),
                                         ("extra", "truncated or corrupt"), ("short_header", "shorter than")])
def test_bad_shard_errors_name_the_file(tmp_path: Path, kind: str, needle: str) -> None:
    path = tmp_path / f"fineweb_val_{kind}.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    _corrupt(path, kind)
    with pytest.raises(shards.ShardError, match=needle) as e:
        shards.load_shard(path)
    assert str(path) in str(e.value)


def test_token_id_beyond_vocab_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.array([1, 5, 1024], dtype=np.uint16))
    shards.load_shard(path, vocab_size=1025)
    with pytest.raises(shards.ShardError, match="token id 1024 >= vocab size 1024") as e:
        shards.load_shard(path, vocab_size=1024)
    assert str(path) in str(e.value)


# -----------------------------------------------------------------------------
# tokenize_docs
# -----------------------------------------------------------------------------

def test_tokenizer_settings_are_upstreams(small_sp: spm.SentencePieceProcessor) -> None:
    assert (small_sp.pad_id(), small_sp.bos_id(), small_sp.eos_id(), small_sp.unk_id()) == (0, 1, 2, 3)
    assert small_sp.vocab_size() == 384
    assert small_sp.encode("2024") == [small_sp.piece_to_id(c) for c in "2024"]  # split_digits
    assert small_sp.encode("😀") == [small_sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]  # byte fallback
    assert small_sp.decode(small_sp.encode("ﬁ")) == "fi"  # nmt_nfkc
    assert small_sp.id_to_piece(small_sp.encode("a b")[1]).startswith("\u2581")
    assert not small_sp.id_to_piece(small_sp.encode("hello")[0]).startswith("\u2581")  # add_dummy_prefix=False


def test_train_tokenizer_is_deterministic(tmp_path: Path) -> None:
    texts = _pydoc_text(60_000)
    a = tokenize_docs.train_tokenizer(texts, 384, tmp_path / "a")
    b = tokenize_docs.train_tokenizer(texts, 384, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()  # and the bytes embed no output path
    # The .vocab we write is the one SentencePiece itself writes for a model_prefix.
    spm.SentencePieceTrainer.train(sentence_iterator=tokenize_docs.trainer_sentences(texts), vocab_size=384,
                                   model_prefix=str(tmp_path / "ref"), minloglevel=2,
                                   **tokenize_docs.SP_TRAINER_SETTINGS)
    assert (tmp_path / "a.vocab").read_bytes() == (tmp_path / "ref.vocab").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_trainer_sentences_cut_long_docs_at_whitespace() -> None:
    long_doc = " ".join(f"word{i}" for i in range(3000))  # ~26 KB: over the trainer's sentence limit
    chunks = list(tokenize_docs.trainer_sentences(["  short \x00 doc  ", "", long_doc]))
    assert chunks[0] == "short   doc"
    assert len(chunks) > 2
    assert all(len(c.encode()) <= tokenize_docs.TRAINER_MAX_SENTENCE_BYTES for c in chunks)
    assert " ".join(chunks[1:]).split() == long_doc.split()


def test_export_manifest_matches_files(tmp_path: Path) -> None:
    texts = VAL_DOCS + _pydoc_text(60_000)
    docs = _write_docs(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "ds"
    rc = tokenize_docs.main(["--docs", str(docs), "--vocab-size", "384", "--num-val-docs", "3", "--out", str(out),
                             "--tokenizer-out", str(tmp_path / "tok"), "--shard-tokens", "5000"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert (out / m["tokenizer"]).resolve() == (tmp_path / "tok.model").resolve()
    assert m["tokenizer_sha256"] == tokenize_docs.file_sha256(tmp_path / "tok.model")
    assert (m["vocab_size"], m["bos_id"], m["tokenizer_trained_on"]) == (384, 1, "train")
    for split, split_texts in (("val", texts[:3]), ("train", texts[3:])):
        s = m["splits"][split]
        assert s["docs"] == len(split_texts)
        assert s["bytes"] == sum(len(t.encode("utf-8")) for t in split_texts)
        names = sorted(p.name for p in out.glob(f"fineweb_{split}_*.bin"))
        assert [f["name"] for f in s["files"]] == names
        for f in s["files"]:
            assert f["sha256"] == tokenize_docs.file_sha256(out / f["name"])
            assert f["tokens"] == shards.read_shard_header(out / f["name"])
        stream = np.concatenate([shards.load_shard(out / n) for n in names])
        expected = np.concatenate([[1] + sp.encode(t) for t in split_texts])
        np.testing.assert_array_equal(stream, expected)  # [BOS]+ids per doc, no EOS, packed across shards
        assert s["tokens"] == stream.size
    assert len(m["splits"]["train"]["files"]) > 1 and all(
        f["tokens"] == 5000 for f in m["splits"]["train"]["files"][:-1])


def _piece_set(model: Path) -> set[str]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return {sp.id_to_piece(i) for i in range(sp.vocab_size())}


def test_tokenizer_never_sees_val_unless_asked(tmp_path: Path) -> None:
    val = ["zqxvjk " * 300, "the zqxvjk again " * 100]  # a word that exists only in val docs
    docs = _write_docs(tmp_path / "docs.jsonl", val + _pydoc_text(80_000))
    common = ["--docs", str(docs), "--vocab-size", "400", "--num-val-docs", "2"]
    assert tokenize_docs.main(common + ["--out", str(tmp_path / "a"), "--tokenizer-out", str(tmp_path / "a")]) == 0
    assert tokenize_docs.main(common + ["--out", str(tmp_path / "b"), "--tokenizer-out", str(tmp_path / "b"),
                                        "--tokenizer-sees-val"]) == 0
    assert not any("zq" in p for p in _piece_set(tmp_path / "a.model"))
    assert {"zqxvjk", "\u2581zqxvjk"} & _piece_set(tmp_path / "b.model")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["tokenizer_trained_on"] == "train"
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["tokenizer_trained_on"] == "train+val"


@pytest.mark.parametrize("case", ["missing", "bad_json", "no_text", "k_too_big", "vocab_tiny", "vocab_short",
                                  "caseops_vocab_tiny"])
def test_tokenize_docs_errors(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    docs = _write_docs(tmp_path / "docs.jsonl", ["alpha beta", "gamma delta", "epsilon"])
    vocab, k, needle = "300", "1", ""
    if case == "missing":
        docs, needle = tmp_path / "nope.jsonl", "nope.jsonl: no such docs file"
    elif case == "bad_json":
        docs.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
        needle = "docs.jsonl:3: not valid JSON"
    elif case == "no_text":
        docs.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
        needle = 'docs.jsonl:2: expected a JSON object with a string field "text"'
    elif case == "k_too_big":
        k, needle = "3", "has 3 docs"
    elif case == "vocab_tiny":
        vocab, needle = "100", "vocab size 100 is too small"
    elif case == "vocab_short":  # above the 260 meta pieces but below them + the text's characters
        docs = _write_docs(tmp_path / "docs.jsonl", ["x"] + _pydoc_text(20_000))
        vocab, needle = "270", "vocab size 270 is too small for this text: SentencePiece needs at least"
    elif case == "caseops_vocab_tiny":  # 4 more reserved ids: the operators
        vocab, needle = "264", "more than 264 ids (4 special + 4 CaseOps operator + 256 byte pieces)"
    rc = tokenize_docs.main(["--docs", str(docs), "--vocab-size", vocab, "--num-val-docs", k,
                             "--out", str(tmp_path / "out"), "--tokenizer-out", str(tmp_path / "tok")]
                            + ["--caseops"] * (case == "caseops_vocab_tiny"))
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# builtin corpus
# -----------------------------------------------------------------------------

WIKI_SAMPLE = "\n".join([
    '{{Infobox person|name=Ada {{nowrap|Lovelace}}|image=Ada.jpg}}',
    "'''Ada Lovelace''' (10 December 1815 – 27 November 1852) was an [[England|English]] [[mathematician]]."
    '<ref name="a">Toole, p. 5</ref> She wrote notes<ref>{{cite book|title=Notes}}</ref> on the '
    "''[[Analytical Engine]]''.<ref name=\"b\"/>",
    '<!-- a hidden comment -->',
    '[[File:Ada Lovelace portrait.jpg|thumb|Portrait by [[Alfred Edward Chalon|Chalon]], {{circa|1840}}]]',
    '',
    '== Early life ==',
    'Her father was [[Lord Byron]]&nbsp;&amp; her mother [[Anne Isabella Milbanke|Annabella]].',
    '{| class="wikitable"',
    '|-',
    '! Year !! Event',
    '|-',
    '| 1835',
    '{| nested',
    '| inner',
    '|}',
    '|}',
    '* She met [[Charles Babbage]] in 1833.',
    '** See the [http://example.org/ada Ada archive] and <span style="x">more</span>.',
    '=== Legacy ===',
    "'''''Ada''''' is a programming language.<br/>",
    '',
    '[[Category:1815 births]]',
    '[[de:Ada Lovelace]]',
    '',
])


def test_strip_wiki_markup() -> None:
    out = builtin_corpus.strip_wiki_markup(WIKI_SAMPLE)
    assert out == (
        "Ada Lovelace (10 December 1815 – 27 November 1852) was an English mathematician. She wrote notes on the "
        "Analytical Engine.\n\n"
        "Early life\n"
        "Her father was Lord Byron\u00a0& her mother Annabella.\n"
        "She met Charles Babbage in 1833.\n"
        "See the Ada archive and more.\n"
        "Legacy\n"
        "Ada is a programming language."
    ).replace("\u00a0", " ")


def _fake_gensim_wheel(path: Path, n_lee: int = 30) -> Path:
    ns = "http://www.mediawiki.org/xml/export-0.10/"

    def page(title: str, ns_id: int, text: str) -> str:
        return (f"<page><title>{title}</title><ns>{ns_id}</ns><revision><text>{text}</text></revision></page>")

    body = "'''Albedo''' is the [[reflection|reflectivity]] of a surface.&lt;ref&gt;x&lt;/ref&gt; " * 40
    xml = (f'<mediawiki xmlns="{ns}">' + page("Albedo", 0, body) + page("AccessibleComputing", 0, "#REDIRECT [[X]]")
           + page("Wikipedia:About", 4, "meta page text") + page("Alabama", 0, "Alabama is a state. " * 50)
           + "</mediawiki>")
    lee = "".join(f"News story {i}: the minister said the bushfire near town {i} was contained.\n"
                  for i in range(n_lee))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(builtin_corpus.WIKI_MEMBER, bz2.compress(xml.encode()))
        z.writestr(builtin_corpus.LEE_MEMBER, lee)
    return path


def test_gensim_docs_from_wheel(tmp_path: Path) -> None:
    docs = builtin_corpus.gensim_docs(_fake_gensim_wheel(tmp_path / "gensim-4.4.0-py3-none-any.whl"))
    assert len(docs) == 2 + 30  # redirect and non-article namespace skipped
    assert docs[0].startswith("Albedo\n\nAlbedo is the reflectivity of a surface. Albedo")
    assert "<" not in docs[0] and docs[1].startswith("Alabama\n\n") and docs[2].startswith("News story 0:")


def test_ensure_builtin_dataset_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "builtin").mkdir()
    _fake_gensim_wheel(tmp_path / "builtin" / "gensim-4.4.0-py3-none-any.whl")  # a cached wheel: no download
    ds, model = builtin_corpus.ensure_builtin_dataset(tmp_path, vocab_size=300, num_val_docs=4, source="gensim")
    assert model == tmp_path / "tokenizers" / "builtin_300_bpe.model" and model.is_file()
    assert ds == tmp_path / "datasets" / "builtin_sp300"
    shard = ds / "fineweb_val_000000.bin"
    stamp = shard.stat().st_mtime_ns
    m = json.loads((ds / "manifest.json").read_text())
    assert m["splits"]["val"]["docs"] == 4 and m["splits"]["train"]["docs"] == 28 and "gensim" in m["source"]
    capsys.readouterr()
    builtin_corpus.ensure_builtin_dataset(tmp_path, vocab_size=300, num_val_docs=4, source="gensim")
    assert "up to date" in capsys.readouterr().out and shard.stat().st_mtime_ns == stamp
    shard.write_bytes(shard.read_bytes()[:-2])  # a damaged output is rebuilt, not trusted
    builtin_corpus.ensure_builtin_dataset(tmp_path, vocab_size=300, num_val_docs=4, source="gensim")
    assert "up to date" not in capsys.readouterr().out
    assert shards.read_shard_header(shard) == m["splits"]["val"]["tokens"]


def test_auto_source_falls_back_to_pydoc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    def offline(cache_dir: Path) -> Path:
        raise builtin_corpus.SourceUnavailable("pip download gensim==4.4.0 failed: no network")

    monkeypatch.setattr(builtin_corpus, "fetch_gensim_wheel", offline)
    docs, used = builtin_corpus.collect_docs(tmp_path, "auto")
    assert used == "pydoc" and sorted(docs) == sorted(builtin_corpus.pydoc_docs())
    assert "falling back to CPython pydoc_data.topics" in capsys.readouterr().err
    with pytest.raises(builtin_corpus.SourceUnavailable):
        builtin_corpus.collect_docs(tmp_path, "gensim")


# -----------------------------------------------------------------------------
# bpb audit
# -----------------------------------------------------------------------------

def _val_dataset(tmp_path: Path, sp: spm.SentencePieceProcessor, val_tokens: list[int] | None = None) -> Path:
    out = tmp_path / "ds"
    tokenize_docs.export_dataset(VAL_DOCS + ["some train text"], sp, len(VAL_DOCS), out)
    if val_tokens is not None:
        write_shard(out / "fineweb_val_000000.bin", np.array(val_tokens, dtype=np.uint16))
    return out


def _model_path(sp: spm.SentencePieceProcessor, tmp_path: Path) -> Path:
    path = tmp_path / "tok.model"
    path.write_bytes(sp.serialized_model_proto())
    return path


def test_lut_equals_decoded_bytes(tmp_path: Path, small_sp: spm.SentencePieceProcessor) -> None:
    ds = _val_dataset(tmp_path, small_sp)
    n = shards.read_shard_header(ds / "fineweb_val_000000.bin")
    r = bpb_audit.audit(ds, _model_path(small_sp, tmp_path), seq_len=n - 1)  # n-1: every val token is scored
    targets = shards.load_shard(ds / "fineweb_val_000000.bin")[1:]
    assert sum(small_sp.is_byte(int(t)) for t in targets) >= 20  # byte fallback exercised
    assert any(not small_sp.is_byte(int(t)) and len(small_sp.id_to_piece(int(t)).encode()) >
               len(small_sp.id_to_piece(int(t))) for t in targets)  # a multi-byte (é, ü) piece exercised
    # Third count, independent of the audit code: bytes of each doc's normalized text.
    normalized = sum(len(small_sp.decode(small_sp.encode(d)).encode("utf-8")) for d in VAL_DOCS)
    assert r.lut_bytes == r.decoded_bytes == normalized
    assert r.passed and r.scored_tokens == n - 1 and r.docs == len(VAL_DOCS) and not r.last_doc_truncated
    assert r.raw_doc_bytes is None  # export_dataset alone writes no manifest
    assert r.decoded_bytes_all_val == normalized


def test_audit_reconciles_a_cut_byte_fallback_character(tmp_path: Path, small_sp: spm.SentencePieceProcessor) -> None:
    ds = _val_dataset(tmp_path, small_sp)
    tokens = shards.load_shard(ds / "fineweb_val_000000.bin")
    emoji = [small_sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    p = max(i for i in range(tokens.size - 3) if tokens[i:i + 4].tolist() == emoji) + 1
    assert 2 * p > tokens.size - 1  # seq_len p keeps tokens[:p+1]: the emoji cut after 2 of its 4 bytes
    r = bpb_audit.audit(ds, _model_path(small_sp, tmp_path), seq_len=p)
    lead, bad = r.terms
    assert r.last_doc_truncated and (bad.tokens, bad.lut_bytes) == (2, 2)
    assert bad.decoded_bytes == len(small_sp.decode(emoji[:2]).encode()) > 2  # U+FFFD per bad byte
    assert r.decoded_bytes - r.lut_bytes == bad.decoded_bytes - bad.lut_bytes
    assert r.passed and r.reconciled_bytes == r.lut_bytes
    assert "invalid-UTF-8 byte-fallback runs: 2 tokens" in bpb_audit.report(r, ds)


def test_audit_leading_space_after_bos(tmp_path: Path, small_sp: spm.SentencePieceProcessor) -> None:
    # sp.encode never starts a doc with '▁' (leading whitespace is normalized away), so write such docs by hand.
    the, of = small_sp.piece_to_id("\u2581the"), small_sp.encode("x of")[1:]
    assert small_sp.id_to_piece(of[0]).startswith("\u2581")
    tokens = [1, the] + small_sp.encode("x") + [1] + of + [1, the, the]
    ds = _val_dataset(tmp_path, small_sp, tokens)
    r = bpb_audit.audit(ds, _model_path(small_sp, tmp_path), seq_len=len(tokens) - 1)
    lead, _ = r.terms
    first_of = len(small_sp.id_to_piece(of[0])) - 1
    assert lead.tokens == 3 and lead.decoded_bytes == lead.lut_bytes == 3 + first_of + 3  # no space counted
    assert r.passed and r.lut_bytes == r.decoded_bytes == len("thex") + len("of") + len("the the")


def test_audit_fails_on_an_unexplained_difference(tmp_path: Path, small_sp: spm.SentencePieceProcessor,
                                                  capsys: pytest.CaptureFixture) -> None:
    # An EOS inside a doc: the LUT treats it as a boundary (drops the next '▁'), sp.decode keeps the space.
    tokens = [1] + small_sp.encode("a") + [2, small_sp.piece_to_id("\u2581the"), 1, 5]
    ds, tok = _val_dataset(tmp_path, small_sp, tokens), _model_path(small_sp, tmp_path)
    r = bpb_audit.audit(ds, tok, seq_len=len(tokens) - 1)
    assert not r.passed and r.decoded_bytes == r.lut_bytes + 1 and [m[0] for m in r.mismatches] == [0]
    assert bpb_audit.main(["--data-dir", str(ds), "--tokenizer", str(tok), "--seq-len", str(len(tokens) - 1)]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no_dir", "no_tokenizer", "bad_tokenizer", "no_shards"])
def test_audit_input_errors(tmp_path: Path, small_sp: spm.SentencePieceProcessor, capsys: pytest.CaptureFixture,
                            case: str) -> None:
    ds, tok = tmp_path / "ds", _model_path(small_sp, tmp_path)
    ds.mkdir()
    if case == "no_dir":
        ds = tmp_path / "missing"
    elif case == "no_tokenizer":
        tok = tmp_path / "missing.model"
    elif case == "bad_tokenizer":
        tok.write_bytes(b"not a model")
    assert bpb_audit.main(["--data-dir", str(ds), "--tokenizer", str(tok)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_tiny_dataset_fixture_passes_the_audit(tiny_dataset) -> None:
    r = bpb_audit.audit(tiny_dataset.data_dir, tiny_dataset.tokenizer, seq_len=1024)
    assert r.passed and r.lut_bytes == r.decoded_bytes and 20_000 <= r.scored_tokens <= 40_000
    assert shards.load_val_tokens(str(tiny_dataset.data_dir / shards.VAL_GLOB), 1024,
                                     tiny_dataset.vocab_size).max() < tiny_dataset.vocab_size
    assert r.raw_doc_bytes is not None and r.decoded_bytes_all_val <= r.raw_doc_bytes


def test_audit_refuses_a_tokenizer_the_manifest_does_not_name(tiny_dataset, small_sp: spm.SentencePieceProcessor,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = _model_path(small_sp, tmp_path)  # a real tokenizer, just not the one these shards were made with
    want = json.loads((tiny_dataset.data_dir / "manifest.json").read_text())["tokenizer_sha256"]
    rc = bpb_audit.main(["--data-dir", str(tiny_dataset.data_dir), "--tokenizer", str(other), "--seq-len", "1024"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert tokenize_docs.file_sha256(other) in err and want in err
    with pytest.raises(bpb_audit.AuditError, match="not the tokenizer these shards were made with"):
        bpb_audit.audit(tiny_dataset.data_dir, other, seq_len=1024)
