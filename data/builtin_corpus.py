"""Build the offline English corpus for CPU dry runs and tests: docs -> SentencePiece BPE -> token shards.

    python data/builtin_corpus.py    # -> data/datasets/builtin_sp1024/ + data/tokenizers/builtin_1024_bpe.model
    python data/builtin_corpus.py --caseops
                                     # -> data/datasets/builtin_caseops_sp1024/ (+ val byte sidecars)
                                     #    + data/tokenizers/builtin_caseops_1024_bpe.model

Source (real English prose, fetched on a fresh machine only through a package manager): the test data inside
the PyPI wheel gensim==4.4.0 (`pip download --no-deps`, never installed or imported), read with zipfile + bz2:
  * 106 Wikipedia articles (MediaWiki XML dump excerpt, markup stripped to prose). Wikipedia text is licensed
    CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/); attribution: the Wikipedia contributors.
  * the Lee background corpus: 300 Australian news articles (Lee, Pincombe & Welsh 2005), as shipped by gensim.
Fallback when PyPI is unreachable: CPython's own pydoc_data.topics (the language reference's help topics).
One doc per article/topic, shuffled with a fixed seed (like FineWeb's frozen shuffled export) so val mixes
sources. Every step is skipped when its output is present and matches its inputs; --force redoes them.
"""

from __future__ import annotations

import argparse
import bz2
import html
import io
import json
import random
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from data import tokenize_docs

GENSIM_REQ = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
SHUFFLE_SEED = 20240520
# Val docs per source. gensim: 27 docs = 103,290 tokens at vocab 1024 (~100k keeps CPU evals fast). pydoc's 79
# topics hold only ~150k tokens in all, so its val is 8 docs, ~10% (~10k tokens).
DEFAULT_VAL_DOCS = {"gensim": 27, "pydoc": 8}
SOURCE_NAMES = {
    "gensim": f"{GENSIM_REQ} test data: Wikipedia (CC BY-SA 3.0) + Lee news corpus",
    "pydoc": "CPython pydoc_data.topics",
}
REPO_DATA = Path(__file__).resolve().parent


class SourceUnavailable(RuntimeError):
    """The gensim wheel could not be fetched or read."""


# -----------------------------------------------------------------------------
# MediaWiki markup -> prose
# -----------------------------------------------------------------------------

_DROP_LINK_PREFIX = re.compile(r"\s*(file|image|category|media)\s*:", re.I)
_INTERWIKI = re.compile(r"[a-z]{2,3}(-[a-z]+)*:")  # [[de:Anarchismus]]-style interlanguage links
_CONTENT_TAGS = "ref|gallery|math|timeline|score|syntaxhighlight|source|imagemap|graph"


def _innermost_templates_removed(text: str) -> str:
    """Remove {{...}} templates innermost-first, so nesting needs no parser."""
    pattern = re.compile(r"\{\{[^{}]*\}\}")
    while True:
        text, n = pattern.subn("", text)
        if n == 0:
            return text


def _tables_removed(text: str) -> str:
    """Drop {| ... |} tables (nestable); they hold data, not prose."""
    out, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif depth == 0:
            out.append(line)
    return "\n".join(out)


def _links_replaced(text: str) -> str:
    """[[a|b]] -> b, [[a]] -> a; File/Image/Category/Media and interlanguage links dropped, whatever brackets
    their captions nest."""
    out, i = [], 0
    while (start := text.find("[[", i)) != -1:
        depth, j = 0, start
        while j < len(text):
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
                if depth == 0:
                    break
            else:
                j += 1
        if depth:  # unclosed: keep the brackets as text
            out.append(text[i:start + 2])
            i = start + 2
            continue
        out.append(text[i:start])
        inner = text[start + 2:j - 2]
        if not (_DROP_LINK_PREFIX.match(inner) or _INTERWIKI.match(inner)):
            inner = _links_replaced(inner)
            out.append(inner.split("|", 1)[1] if "|" in inner else inner.lstrip(":"))
        i = j
    out.append(text[i:])
    return "".join(out)


def strip_wiki_markup(text: str) -> str:
    """MediaWiki source -> readable prose (good enough for a language-model corpus, not a full parser)."""
    text = re.sub(r"<!--.*?(-->|\Z)", "", text, flags=re.S)
    text = re.sub(rf"<({_CONTENT_TAGS})\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(rf"<({_CONTENT_TAGS})\b[^>]*>.*?</\1\s*>", "", text, flags=re.I | re.S)
    text = _innermost_templates_removed(text)
    text = _tables_removed(text)
    text = _links_replaced(text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__, __NOTOC__
    text = re.sub(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", r"\2", text, flags=re.M)
    text = re.sub(r"^[ \t]*-{4,}[ \t]*$", "", text, flags=re.M)
    text = re.sub(r"^[ \t]*[*#:;]+[ \t]*", "", text, flags=re.M)
    text = html.unescape(text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" +([,.;:])", r"\1", text)  # "word ." left where a ref or template was removed
    text = re.sub(r"\([ ,;]*\)", "", text)  # "()" left by a removed pronunciation template
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# -----------------------------------------------------------------------------
# Sources
# -----------------------------------------------------------------------------

def _wheel_members_ok(wheel: Path) -> bool:
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            return WIKI_MEMBER in names and LEE_MEMBER in names
    except (OSError, zipfile.BadZipFile):
        return False


def fetch_gensim_wheel(cache_dir: Path) -> Path:
    """The gensim wheel in cache_dir, downloaded with pip only if no valid one is cached."""
    cached = sorted(cache_dir.glob("gensim-4.4.0-*.whl"))
    for wheel in cached:
        if _wheel_members_ok(wheel):
            return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    for wheel in cached:
        wheel.unlink()
    # Any platform's wheel carries the same test data; --only-binary keeps pip from building an sdist.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", GENSIM_REQ,
           "-d", str(cache_dir)]
    print(f"builtin_corpus: fetching {GENSIM_REQ} wheel (~28 MB): {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SourceUnavailable(f"pip download {GENSIM_REQ} failed: {last}")
    for wheel in sorted(cache_dir.glob("gensim-4.4.0-*.whl")):
        if _wheel_members_ok(wheel):
            return wheel
    raise SourceUnavailable(f"pip downloaded no gensim 4.4.0 wheel with {LEE_MEMBER} into {cache_dir}")


def wiki_docs(xml_bytes: bytes) -> list[str]:
    """Article pages (namespace 0, not #REDIRECT) as 'Title\\n\\nprose', in dump order."""
    docs = []
    for _, el in ET.iterparse(io.BytesIO(xml_bytes)):
        if not el.tag.endswith("}page"):
            continue
        ns = el.tag[:-len("page")]
        title, namespace = el.findtext(f"{ns}title") or "", el.findtext(f"{ns}ns")
        body = el.findtext(f"{ns}revision/{ns}text") or ""
        el.clear()
        if namespace != "0" or body.lstrip().upper().startswith("#REDIRECT"):
            continue
        if prose := strip_wiki_markup(body):
            docs.append(f"{title}\n\n{prose}")
    return docs


def gensim_docs(wheel: Path) -> list[str]:
    """Wikipedia articles + Lee news articles (one per line) from the wheel's test data."""
    try:
        with zipfile.ZipFile(wheel) as z:
            xml_bytes = bz2.decompress(z.read(WIKI_MEMBER))
            lee = z.read(LEE_MEMBER).decode("utf-8")
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise SourceUnavailable(f"{wheel}: cannot read test data ({e})") from None
    return wiki_docs(xml_bytes) + [line.strip() for line in lee.splitlines() if line.strip()]


def pydoc_docs() -> list[str]:
    """CPython's help topics, one doc per topic (sorted by name)."""
    from pydoc_data.topics import topics
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def collect_docs(cache_dir: Path, source: str) -> tuple[list[str], str]:
    """(shuffled docs, source used) for source in {auto, gensim, pydoc}; auto falls back to pydoc with a warning."""
    used = source
    if source in ("auto", "gensim"):
        try:
            docs, used = gensim_docs(fetch_gensim_wheel(cache_dir)), "gensim"
        except SourceUnavailable as e:
            if source == "gensim":
                raise
            print(f"WARNING: {e}\nWARNING: falling back to {SOURCE_NAMES['pydoc']} (~465 KB of reference prose, "
                  f"not the gensim corpus)", file=sys.stderr)
            used = "pydoc"
    if used == "pydoc":
        docs = pydoc_docs()
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs, used


def _write_docs_if_changed(docs: list[str], path: Path) -> bool:
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def _dataset_is_current(dataset_dir: Path, model_path: Path, docs_path: Path, vocab_size: int,
                        num_val_docs: int, caseops: bool = False) -> bool:
    """True if manifest.json describes exactly these inputs and every file it names is intact."""
    try:
        m = json.loads((dataset_dir / "manifest.json").read_text(encoding="utf-8"))
        if (m["docs_sha256"], m["vocab_size_requested"], m["splits"]["val"]["docs"], m["tokenizer_trained_on"],
                m.get("caseops", False)) != (tokenize_docs.file_sha256(docs_path), vocab_size, num_val_docs, "train",
                                             caseops):
            return False
        if (dataset_dir / m["tokenizer"]).resolve() != model_path.resolve():
            return False
        if tokenize_docs.file_sha256(model_path) != m["tokenizer_sha256"]:
            return False
        named = {f["name"]: f["sha256"] for s in m["splits"].values() for f in s["files"] + s.get("sidecar_files", [])}
        present = {p.name for p in dataset_dir.glob("fineweb_*_*.bin")}
        return present == set(named) and all(tokenize_docs.file_sha256(dataset_dir / n) == h for n, h in named.items())
    except (OSError, KeyError, TypeError, ValueError):
        return False


def ensure_builtin_dataset(root: Path = REPO_DATA, vocab_size: int = 1024, num_val_docs: int | None = None,
                           source: str = "auto", force: bool = False, caseops: bool = False) -> tuple[Path, Path]:
    """Build (or reuse) root/datasets/builtin_sp{V}/ and root/tokenizers/builtin_{V}_bpe.model; with caseops,
    root/datasets/builtin_caseops_sp{V}/ (val byte sidecars included) and root/tokenizers/builtin_caseops_{V}_bpe.model
    from the same docs and split. Returns (dataset_dir, tokenizer_model_path). Raises SourceUnavailable /
    tokenize_docs.DocsError."""
    root = Path(root)
    t0 = time.perf_counter()
    docs, used = collect_docs(root / "builtin", source)
    docs_path = root / "builtin" / "docs.jsonl"
    changed = _write_docs_if_changed(docs, docs_path)
    t_docs = time.perf_counter() - t0
    print(f"builtin_corpus: {len(docs)} docs from {SOURCE_NAMES[used]} -> {docs_path} "
          f"({'written' if changed else 'unchanged'}, {t_docs:.1f}s)", flush=True)
    k = DEFAULT_VAL_DOCS[used] if num_val_docs is None else num_val_docs
    kind = "builtin_caseops" if caseops else "builtin"
    dataset_dir = root / "datasets" / f"{kind}_sp{vocab_size}"
    model_prefix = root / "tokenizers" / f"{kind}_{vocab_size}_bpe"
    model_path = model_prefix.with_name(model_prefix.name + ".model")
    if not force and _dataset_is_current(dataset_dir, model_path, docs_path, vocab_size, k, caseops):
        print(f"builtin_corpus: {dataset_dir} is up to date (skipped tokenizer and shards)", flush=True)
    else:
        m = tokenize_docs.build_dataset(docs_path, vocab_size, k, dataset_dir, model_prefix,
                                        extra={"source": SOURCE_NAMES[used], "shuffle_seed": SHUFFLE_SEED},
                                        caseops_mode=caseops)
        print(f"builtin_corpus: tokenizer {model_path} ({m['seconds']['tokenizer']:.1f}s), "
              f"shards {dataset_dir} ({m['seconds']['export']:.1f}s)", flush=True)
    return dataset_dir, model_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Sources: " + "; ".join(f"{k} = {v}" for k, v in SOURCE_NAMES.items()))
    ap.add_argument("--out-root", type=Path, default=REPO_DATA,
                    help="root for builtin/, datasets/ and tokenizers/ (default: this repo's data/)")
    ap.add_argument("--vocab-size", type=int, default=1024, help="SentencePiece vocab size (default 1024)")
    ap.add_argument("--num-val-docs", type=int, default=None,
                    help=f"docs in the val split (default: {DEFAULT_VAL_DOCS['gensim']} for gensim, ~100k tokens; "
                         f"{DEFAULT_VAL_DOCS['pydoc']} for pydoc, ~10%%)")
    ap.add_argument("--source", choices=("auto", "gensim", "pydoc"), default="auto",
                    help="auto = gensim wheel, falling back to pydoc if it cannot be fetched")
    ap.add_argument("--caseops", action="store_true",
                    help="build the CaseOps variant builtin_caseops_sp{V} (lossless case transform, val byte "
                         "sidecars; docs/data.md) from the same docs and split")
    ap.add_argument("--force", action="store_true",
                    help="rebuild docs, tokenizer and shards even if up to date (a valid cached wheel is reused)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        dataset_dir, model_path = ensure_builtin_dataset(args.out_root, args.vocab_size, args.num_val_docs,
                                                         args.source, args.force, args.caseops)
    except (SourceUnavailable, tokenize_docs.DocsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = json.loads((dataset_dir / "manifest.json").read_text(encoding="utf-8"))
    print(f"builtin_corpus: source {m['source']}; vocab {m['vocab_size']}; {tokenize_docs.split_summary(m)}; "
          f"tokenizer {model_path}; {time.perf_counter() - t0:.1f}s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
