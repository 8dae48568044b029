"""Build a record folder from finished runs: the packed train_gpt.py that is counted, its readable twin, the logs,
the artifacts, submission.json and a generated README.md (DESIGN.md "Records", STYLE_ANCHORS.md §3.9/§3.14/§4).

Usage:
  python tools/build_record.py --run runs/s42 --run runs/s314 --run runs/s999 --name "SP8192 QK5 legal TTT" \\
      --track 10min_16mb --author "Jane Doe" --github-id jdoe [--out DIR] [--upstream] [--blurb TEXT] [--date D]

Pipeline: the code comes from the runs' logs (every log starts with the byte-exact frames of the files that ran),
never from the working tree: all seeds must have run identical code. quant/ is inlined into train_gpt.py at its
`# >>> inline quant` block (readable twin), then packed: AST without docstrings (and without function-signature
annotations when nothing reads them), ast.unparse, raw LZMA2 + base85 in the 2-line `exec` wrapper of PR #1394's
lineage. The packed source must be AST-equivalent to the readable one (modulo docstrings and annotations), and a tiny
CPU run of the packed file must train, write an artifact and log its own size as bytes_code. Only then are bytes
counted and the folder written (atomically: built beside the target, then renamed into place).
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import datetime as dt
import functools
import io
import json
import lzma
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.parse_log import parse_log, read_log

ROOT = Path(__file__).resolve().parent.parent

ARTIFACT_LIMIT_BYTES = 16_000_000
TIME_LIMIT_S = 600.0
TRACKS = ("10min_16mb", "non_record_16mb")
UNKNOWN = "unknown"  # author / github_id placeholder for local builds (tools/dryrun.py)
MARK_BEGIN, MARK_END = "# >>> inline quant", "# <<< inline quant"
# The self-extracting wrapper of record P (PR #1394 lineage): raw LZMA2 saves the xz container's ~60 bytes.
WRAP_HEAD = 'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("'
WRAP_TAIL = '"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n'
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
READS_ANNOTATIONS = re.compile(r"__annotations__|get_type_hints|\bsignature\(|annotationlib")
RUN_BOOKKEEPING = {"seed", "run_id", "out_dir"}  # Config fields that differ per run and do not change the result
# Tiny CPU config for the packed-file smoke run: every stage but sliding/TTT, GPTQ on real Hessians (matrices of
# 64x64 and up exceed PASSTHROUGH_NUMEL), a few seconds on one core.
SMOKE_ENV = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="8", MLP_MULT="2",
                 LOOP_START="0", LOOP_END="1", NUM_LOOPS="1", PARALLEL_RESIDUAL_START="1", XSA_LAST_N="2",
                 TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512", GRAD_ACCUM_STEPS="1", ITERATIONS="3",
                 WARMUP_STEPS="1", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1",
                 VAL_BATCH_TOKENS="4096", EVAL_SEQ_LEN="64", EVAL_STRIDE="32", TTT_CHUNK_TOKENS="4096",
                 SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0", GPTQ_CALIBRATION_BATCHES="2",
                 PASSTHROUGH_NUMEL="1024")
SMOKE_TRAIN_TOKENS, SMOKE_VAL_TOKENS = 32_768, 4_097
SMOKE_TIMEOUT_S = 600


class RecordError(Exception):
    """A user-facing problem with the inputs or the build: printed as one line, exit status 1."""


# -----------------------------------------------------------------------------------------------------------------
# inline quant/ into train_gpt.py
# -----------------------------------------------------------------------------------------------------------------

def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _parse(src: str, name: str) -> ast.Module:
    try:
        return ast.parse(src, filename=name)
    except SyntaxError as e:
        raise RecordError(f"{name}: does not parse ({e.msg}, line {e.lineno})") from None


def _bound_imports(node: ast.Import | ast.ImportFrom) -> dict[str, str]:
    """Name bound by each alias of an import -> what it refers to (`np` -> `numpy`, `Tensor` -> `torch:Tensor`)."""
    if isinstance(node, ast.Import):
        return {(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0]) for a in node.names}
    return {(a.asname or a.name): f"{node.module}:{a.name}" for a in node.names}


def _top_level_names(stmts: list[ast.stmt], nested: bool = False) -> set[str]:
    """Names a module body binds at top level: functions, classes, assignment targets, and imports nested in
    if/try/with blocks (`try: from flash_attn_interface import ...`). Plain top-level imports are hoisted and merged,
    so they are checked separately."""
    out: set[str] = set()
    for node in stmts:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom) and nested:
            out |= set(_bound_imports(node))
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.For | ast.While):
            for field in ("body", "orelse", "finalbody"):
                out |= _top_level_names(getattr(node, field, []), nested=True)
            for handler in getattr(node, "handlers", []):
                out |= _top_level_names(handler.body, nested=True)
    return out


def _quant_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "quant":
            out.append(node)
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "quant" for a in node.names):
            out.append(node)
    return out


def _src_lines(src: str) -> list[str]:
    """Lines as the parser numbers them (str.splitlines would also split on form feeds and other separators)."""
    return (src[:-1] if src.endswith("\n") else src).split("\n")


def _import_sort_key(name: str) -> tuple[int, str]:
    """isort's order-by-type inside `from x import ...`: CONSTANTS, Classes, functions."""
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
    return kind, name


def format_imports(plain: set[tuple[str, str | None]], froms: dict[str, set[tuple[str, str | None]]]) -> str:
    """An isort-style import block: stdlib then third-party, `import x` before `from x import y`, sorted."""
    def alias(name: str, asname: str | None) -> str:
        return f"{name} as {asname}" if asname else name

    groups: list[list[str]] = [[], []]
    for std in (True, False):
        lines = groups[0 if std else 1]
        for name, asname in sorted(plain, key=lambda x: (x[0], x[1] or "")):
            if (name.split(".")[0] in sys.stdlib_module_names) == std:
                lines.append(f"import {alias(name, asname)}")
        for module in sorted(froms):
            if (module.split(".")[0] in sys.stdlib_module_names) == std:
                names = [alias(n, a) for n, a in sorted(froms[module], key=lambda x: _import_sort_key(x[0]))]
                line = f"from {module} import {', '.join(names)}"
                if len(line) > 120:
                    line = f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")"
                lines.append(line)
    return "\n\n".join("\n".join(g) for g in groups if g)


def _module_order(mods: dict[str, ast.Module]) -> list[str]:
    """quant module names in dependency order (a module after every quant module it imports from); ties by name."""
    deps = {}
    for name, tree in mods.items():
        deps[name] = set()
        for node in _quant_imports(tree):
            target = node.module.split(".", 1)[1] if isinstance(node, ast.ImportFrom) and "." in node.module else None
            if target is None or target not in mods:
                raise RecordError(f"quant/{name}.py: `{ast.unparse(node)}` cannot be inlined (only `from quant.<module> "
                                  f"import name` of another quant module is supported)")
            deps[name].add(target)
    order: list[str] = []
    while len(order) < len(mods):
        ready = sorted(n for n in mods if n not in order and deps[n] <= set(order))
        if not ready:
            raise RecordError(f"quant/ modules import each other in a cycle: {sorted(set(mods) - set(order))}")
        order.append(ready[0])
    return order


def inline_quant(sources: dict[str, str]) -> str:
    """The readable single-file train_gpt.py: quant/*.py (not __init__) inlined at the marked import block, their
    imports hoisted and merged into train_gpt.py's import block, `from quant...` lines and `__all__` dropped."""
    if "train_gpt.py" not in sources:
        raise RecordError(f"no train_gpt.py among the logged sources ({sorted(sources)})")
    main_src = sources["train_gpt.py"]
    quant_files = {n: s for n, s in sources.items() if n.startswith("quant/")}
    others = sorted(set(sources) - set(quant_files) - {"train_gpt.py"})
    if others:
        raise RecordError(f"logged sources {others} are neither train_gpt.py nor quant/*.py; cannot inline them")
    lines = _src_lines(main_src)
    begins = [i for i, line in enumerate(lines) if line.startswith(MARK_BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.startswith(MARK_END)]
    if not quant_files:
        if begins or ends:
            raise RecordError("train_gpt.py has the inline-quant block but the log holds no quant/*.py sources")
        return unpack(main_src) if is_packed(main_src) else main_src
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise RecordError(f"train_gpt.py must have exactly one `{MARK_BEGIN}` ... `{MARK_END}` block "
                          f"(found {len(begins)} begin and {len(ends)} end markers)")
    b, e = begins[0] + 1, ends[0] + 1  # 1-based line numbers of the markers
    tree = _parse(main_src, "train_gpt.py")

    # the marked block: `from quant import ...` only
    wanted: set[str] = set()
    block = [n for n in tree.body if b < n.lineno < e]
    for node in block:
        if not (isinstance(node, ast.ImportFrom) and node.module == "quant" and node.level == 0):
            raise RecordError(f"train_gpt.py line {node.lineno}: only `from quant import ...` may sit in the inline block")
        for a in node.names:
            if a.asname and a.asname != a.name:
                raise RecordError(f"train_gpt.py line {node.lineno}: `{a.name} as {a.asname}`: aliases are not inlined")
            wanted.add(a.name)
    stray = [n for n in _quant_imports(tree) if not b < n.lineno < e]
    if stray:
        raise RecordError(f"train_gpt.py line {stray[0].lineno}: quant is imported outside the inline block")

    # train_gpt.py's own import block: the imports between `from __future__` and the marker
    head = [n for n in tree.body if n.lineno < b and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    if head and _is_docstring(head[0]) and head[0] is tree.body[0]:
        head = head[1:]
    if not head or not all(isinstance(n, ast.Import | ast.ImportFrom) for n in head):
        raise RecordError("train_gpt.py: only imports may come between `from __future__ import annotations` and the "
                          "inline-quant block (the builder merges the quant imports into them)")
    first_import = head[0].lineno

    # quant modules: bodies without docstring, imports, __all__
    init = quant_files.pop("quant/__init__.py", None)
    if init is not None:
        for node in _parse(init, "quant/__init__.py").body:
            is_all = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                          for t in node.targets)
            if not (_is_docstring(node) or is_all or isinstance(node, ast.ImportFrom)):
                raise RecordError(f"quant/__init__.py line {node.lineno}: only re-exports can be inlined")
    mods = {Path(n).stem: _parse(s, n) for n, s in quant_files.items()}
    order = _module_order(mods)
    plain: set[tuple[str, str | None]] = set()
    froms: dict[str, set[tuple[str, str | None]]] = {}
    bound: dict[str, tuple[str, str]] = {}  # imported name -> (target, file)

    def add_import(node: ast.Import | ast.ImportFrom, where: str) -> None:
        for name, target in _bound_imports(node).items():
            if name in bound and bound[name][0] != target:
                raise RecordError(f"import clash: {where} binds {name} to {target}, {bound[name][1]} to {bound[name][0]}")
            bound[name] = (target, where)
        if isinstance(node, ast.Import):
            plain.update((a.name, a.asname) for a in node.names)
        else:
            froms.setdefault(node.module, set()).update((a.name, a.asname) for a in node.names)

    for node in head:
        add_import(node, "train_gpt.py")
    main_rest = [n for n in tree.body if n.lineno > e]
    defined = {name: "train_gpt.py" for name in _top_level_names(main_rest)}
    chunks: list[str] = []
    needs: list[tuple[str, str, str]] = []  # (name, defining module, importing module) between quant modules
    for mod in order:
        fname = f"quant/{mod}.py"
        src_lines = _src_lines(quant_files[fname])
        drop: set[int] = set()
        body = mods[mod].body
        doc = ""
        kept_nodes = []
        for i, node in enumerate(body):
            is_all = isinstance(node, ast.Assign | ast.AnnAssign) and any(
                isinstance(t, ast.Name) and t.id == "__all__"
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
            if i == 0 and _is_docstring(node):
                doc = node.value.value
            elif isinstance(node, ast.Import | ast.ImportFrom):
                if _quant_imports(node):
                    needs += [(a.name, f"quant/{node.module.split('.', 1)[1]}.py", fname) for a in node.names]
                elif not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                    add_import(node, fname)
            elif not is_all:
                kept_nodes.append(node)
                continue
            drop.update(range(node.lineno, node.end_lineno + 1))
        for name in _top_level_names(kept_nodes):
            if name in defined:
                raise RecordError(f"name clash: {fname} and {defined[name]} both define `{name}` at top level; "
                                  f"rename one (inlining puts them in one namespace)")
            defined[name] = fname
        kept = "\n".join(line for n, line in enumerate(src_lines, 1) if n not in drop)
        kept = re.sub(r"\n{3,}", "\n\n\n", kept).strip("\n")
        header = f"# ---- {fname}" + "".join(f"\n# {line}".rstrip() for line in doc.strip().splitlines())
        chunks.append(f"{header}\n\n\n{kept}")
    for name, src, user in needs:
        if defined.get(name) != src:
            raise RecordError(f"{user} imports `{name}` from {src}, which does not define it at top level")
    for name in sorted(wanted):
        if defined.get(name, "train_gpt.py") == "train_gpt.py":
            raise RecordError(f"train_gpt.py imports `{name}` from quant but no inlined quant module defines it")
    clash = sorted(set(defined) & set(bound))
    if clash:
        raise RecordError(f"name clash: `{clash[0]}` is both imported and defined at top level ({defined[clash[0]]})")

    inlined = (f"{MARK_BEGIN}: {', '.join(f'quant/{m}.py' for m in order)} (inlined by tools/build_record.py)\n\n"
               + "\n\n\n".join(chunks) + f"\n\n\n{MARK_END}")
    out = lines[:first_import - 1] + [format_imports(plain, froms), "", inlined] + lines[e:]
    text = "\n".join(out) + "\n"
    _parse(text, "train_gpt_readable.py")
    return text


# -----------------------------------------------------------------------------------------------------------------
# pack, unpack, equivalence
# -----------------------------------------------------------------------------------------------------------------

class _StripForPack(ast.NodeTransformer):
    """Docstrings out; annotations out where nothing can read them: class bodies keep theirs (dataclass fields)."""

    def __init__(self, drop_signatures: bool):
        self.drop_signatures = drop_signatures
        self.in_class = [False]

    def _body(self, node: ast.AST) -> None:
        if node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]

    def visit_Module(self, node: ast.Module) -> ast.Module:
        self._body(node)
        self.generic_visit(node)
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        self._body(node)
        self.in_class.append(True)
        self.generic_visit(node)
        self.in_class.pop()
        return node

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        self._body(node)
        if self.drop_signatures:
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]:
                arg.annotation = None
            node.returns = None
        self.in_class.append(False)
        self.generic_visit(node)
        self.in_class.pop()
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if self.in_class[-1] or node.value is None:  # dataclass fields; a bare `x: T` also declares a local
            return node
        return ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)


def _one_space_indent(src: str) -> str:
    """ast.unparse's 4-space indents as 1 space (-1.6% packed), except on lines inside multi-line string tokens."""
    inside: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.start[0] < tok.end[0] and tok.type in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)):
            inside.update(range(tok.start[0] + 1, tok.end[0] + 1))
    out = []
    for n, line in enumerate(src.split("\n"), 1):
        body = line.lstrip(" ")
        out.append(line if n in inside else " " * ((len(line) - len(body)) // 4) + body)
    return "\n".join(out)


def strip_source(src: str) -> str:
    """The source to pack: ast.unparse of the AST without docstrings and (when safe) signature annotations,
    indented by one space."""
    tree = _StripForPack(drop_signatures=not READS_ANNOTATIONS.search(src)).visit(_parse(src, "train_gpt_readable.py"))
    return _one_space_indent(ast.unparse(ast.fix_missing_locations(tree)) + "\n")


def pack(src: str) -> str:
    """The 2-line self-extracting train_gpt.py for a readable source (deterministic: same input, same bytes)."""
    blob = lzma.compress(strip_source(src).encode("utf-8"), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    return WRAP_HEAD + base64.b85encode(blob).decode("ascii") + WRAP_TAIL


def is_packed(text: str) -> bool:
    return text.startswith(WRAP_HEAD) and text.endswith(WRAP_TAIL)


def unpack(text: str) -> str:
    """The source inside a packed train_gpt.py written by `pack`."""
    if not is_packed(text):
        raise RecordError("not a packed train_gpt.py (expected the 2-line lzma/base85 exec wrapper)")
    blob = text[len(WRAP_HEAD):-len(WRAP_TAIL)]
    try:
        raw = lzma.decompress(base64.b85decode(blob), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        return raw.decode("utf-8")
    except (ValueError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise RecordError(f"packed train_gpt.py does not decode: {e}") from None


class _Normalize(ast.NodeTransformer):
    """For equivalence: every docstring and every annotation gone (independent of what the packer chose to keep)."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if node.body and _is_docstring(node.body[0]):
                node.body = node.body[1:] or [ast.Pass()]
        if isinstance(node, ast.arg):
            node.annotation = None
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.returns = None
        return super().generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        self.generic_visit(node)
        value = node.value if node.value is not None else ast.Constant(value=Ellipsis)
        return ast.Assign(targets=[node.target], value=value, lineno=node.lineno)


@functools.lru_cache(maxsize=16)  # pure; check_record compares the same few sources several times
def normalized_dump(src: str, name: str) -> str:
    return ast.dump(_Normalize().visit(_parse(src, name)))


def check_equivalent(readable: str, packed: str) -> None:
    """Raise RecordError unless the packed file decodes to the readable source modulo docstrings and annotations."""
    a, b = normalized_dump(readable, "train_gpt_readable.py"), normalized_dump(unpack(packed), "packed train_gpt.py")
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise RecordError(f"packed train_gpt.py is not equivalent to the readable source (ASTs differ near "
                          f"...{a[max(0, at - 60):at + 40]!r}...)")


# -----------------------------------------------------------------------------------------------------------------
# runs: logs, artifacts, config
# -----------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    log_path: Path
    artifact_path: Path
    parsed: dict[str, Any]

    @property
    def seed(self) -> int:
        return self.parsed["seed"]

    @property
    def artifact_bytes(self) -> int:
        return self.artifact_path.stat().st_size


def run_from_dir(out_dir: Path) -> tuple[Path, Path]:
    """(log, artifact) of a run directory in our layout."""
    if not out_dir.is_dir():
        raise RecordError(f"--run {out_dir}: not a directory")
    logs = sorted((out_dir / "logs").glob("*.txt"))
    if len(logs) != 1:
        raise RecordError(f"--run {out_dir}: expected exactly one logs/*.txt, found {len(logs)}")
    for name in ("final_model.int6.ptz", "run_summary.json"):
        if not (out_dir / name).is_file():
            raise RecordError(f"--run {out_dir}: no {name} (did the run finish?)")
    return logs[0], out_dir / "final_model.int6.ptz"


def load_run(log: Path, artifact: Path) -> Run:
    try:
        parsed = parse_log(read_log(log))
    except OSError as e:
        raise RecordError(str(e)) from None
    if not artifact.is_file():
        raise RecordError(f"artifact {artifact}: no such file")
    missing = [k for k in ("seed", "final_val_bpb", "bytes_model", "time_totals") if parsed[k] is None]
    if missing:
        raise RecordError(f"{log}: no {', '.join(missing)} in the log (an unfinished run, or not our log format)")
    if parsed["sources_error"]:
        raise RecordError(f"{log}: {parsed['sources_error']}")
    if not parsed["sources"]:
        raise RecordError(f"{log}: the log holds no `source_file:` frames, so the code that ran is unknown")
    if artifact.stat().st_size != parsed["bytes_model"]:
        raise RecordError(f"{artifact} has {artifact.stat().st_size} bytes but {log} logged bytes_model:"
                          f"{parsed['bytes_model']}: not this run's artifact")
    return Run(log, artifact, parsed)


def common_sources(runs: list[Run]) -> dict[str, str]:
    """The sources every seed ran (identical across seeds, else RecordError naming the file)."""
    first = runs[0]
    for run in runs[1:]:
        for name in sorted(set(first.parsed["sources"]) | set(run.parsed["sources"])):
            a, b = first.parsed["sources"].get(name), run.parsed["sources"].get(name)
            if a != b:
                what = "is missing from one of them" if a is None or b is None else "differs"
                raise RecordError(f"seed {run.seed} ({run.log_path}) and seed {first.seed} ({first.log_path}) ran "
                                  f"different code: {name} {what}")
    return first.parsed["sources"]


def config_defaults(src: str) -> dict[str, Any]:
    """Literal defaults of the Config dataclass fields in a train_gpt.py source (read from its AST, not run)."""
    tree = _parse(src, "train_gpt.py")
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"), None)
    if cls is None:
        raise RecordError("train_gpt.py has no Config class")
    out: dict[str, Any] = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            with contextlib.suppress(ValueError):
                out[node.target.id] = ast.literal_eval(node.value)
    return out


def _same_value(logged: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(logged, bool):
        return logged is default
    if isinstance(default, int | float) and isinstance(logged, int | float):
        return float(logged) == float(default)
    return str(logged) == str(default)


def _env_value(v: Any) -> str:
    return ("1" if v else "0") if isinstance(v, bool) else shlex.quote(str(v))


def config_overrides(runs: list[Run], defaults: dict[str, Any]) -> dict[str, str]:
    """Env overrides the runs used (Hyperparameters dump vs Config defaults), identical across seeds."""
    per_run = []
    for run in runs:
        hp = run.parsed["hyperparameters"]
        per_run.append({k.upper(): _env_value(hp[k]) for k in sorted(defaults)
                        if k in hp and k not in RUN_BOOKKEEPING and not _same_value(hp[k], defaults[k])})
    for run, ov in zip(runs[1:], per_run[1:]):
        if ov != per_run[0]:
            key = sorted(set(ov.items()) ^ set(per_run[0].items()))[0][0]
            raise RecordError(f"seeds {runs[0].seed} and {run.seed} ran different configs ({key})")
    return per_run[0]


def hardware(runs: list[Run]) -> tuple[str, bool]:
    """(description, is_8xh100) from the logs: nvidia-smi's GPU rows, else the CPU."""
    gpus = runs[0].parsed["gpus"]
    if any(r.parsed["gpus"] != gpus for r in runs):
        raise RecordError("the seeds ran on different hardware (nvidia-smi GPU lists differ)")
    devices = {r.parsed["runtime"].get("device") for r in runs}
    if gpus and devices <= {"cuda"}:
        names = sorted(set(gpus))
        return f"{len(gpus)}x{' + '.join(names)}", len(gpus) == 8 and all("H100" in g for g in gpus)
    cpus = runs[0].parsed["runtime"].get("cpus", "?")
    return f"CPU ({cpus} cores), not 8xH100", False


# -----------------------------------------------------------------------------------------------------------------
# smoke run of the packed file
# -----------------------------------------------------------------------------------------------------------------

def smoke_dataset(work: Path) -> tuple[Path, Path, int]:
    """(dataset dir, tokenizer, vocab) with small train/val shards: cut from the builtin dataset when built
    (python data/builtin_corpus.py), else tokenized here from CPython's pydoc topics (no network)."""
    import numpy as np

    import train_gpt
    from data.shards import write_shard
    builtin, tok = ROOT / "data/datasets/builtin_sp1024", ROOT / "data/tokenizers/builtin_1024_bpe.model"
    out = work / "smoke_data"
    out.mkdir(parents=True)
    if not (tok.is_file() and list(builtin.glob("fineweb_val_*.bin")) and list(builtin.glob("fineweb_train_*.bin"))):
        from data import builtin_corpus, tokenize_docs
        docs = builtin_corpus.pydoc_docs()
        docs_path = work / "docs.jsonl"
        docs_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        tokenize_docs.build_dataset(docs_path, 512, 20, work / "pydoc_sp512", work / "pydoc_512_bpe")
        builtin, tok = work / "pydoc_sp512", work / "pydoc_512_bpe.model"
    for split, n in (("train", SMOKE_TRAIN_TOKENS), ("val", SMOKE_VAL_TOKENS)):
        tokens = np.concatenate([train_gpt.load_shard(p) for p in sorted(builtin.glob(f"fineweb_{split}_*.bin"))])
        write_shard(out / f"fineweb_{split}_000000.bin", tokens[:n])
    import sentencepiece as spm
    return out, tok, spm.SentencePieceProcessor(model_file=str(tok)).vocab_size()


@dataclass(frozen=True)
class SmokeResult:
    seconds: float
    bytes_code: int
    bytes_model: int
    val_bpb: float


def smoke_run(packed: str, work: Path) -> SmokeResult:
    """Run the packed file alone in an empty directory on a tiny CPU config; it must finish, write an artifact and
    log exactly itself as the code that ran."""
    fields = set(config_defaults(unpack(packed)))
    unknown = sorted(k for k in SMOKE_ENV if k.lower() not in fields)
    if unknown:
        raise RecordError(f"smoke config keys {unknown} are not Config fields of this train_gpt.py; update SMOKE_ENV")
    data, tok, vocab = smoke_dataset(work)
    run_dir = work / "record"
    run_dir.mkdir()
    (run_dir / "train_gpt.py").write_text(packed, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k.lower() not in fields and k != "PYTHONPATH"}
    env.update(SMOKE_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), VOCAB_SIZE=str(vocab), OUT_DIR="out",
               RUN_ID="smoke", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=run_dir, env=env, capture_output=True, text=True,
                              timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RecordError(f"smoke run of the packed train_gpt.py did not finish in {SMOKE_TIMEOUT_S} s") from None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RecordError(f"smoke run of the packed train_gpt.py failed (exit {proc.returncode}):\n{tail}")
    artifact, log = run_dir / "out/final_model.int6.ptz", run_dir / "out/logs/smoke.txt"
    if not artifact.is_file() or not log.is_file():
        raise RecordError("smoke run of the packed train_gpt.py exited 0 but wrote no artifact or no log")
    parsed = parse_log(read_log(log))
    size = len(packed.encode("utf-8"))
    if parsed["bytes_code"] != size or parsed["sources"] != {"train_gpt.py": packed}:
        raise RecordError(f"smoke run logged bytes_code:{parsed['bytes_code']} and sources {sorted(parsed['sources'])}; "
                          f"expected the packed file alone ({size} bytes)")
    if parsed["final_val_bpb"] is None or not math.isfinite(parsed["final_val_bpb"]):
        raise RecordError("smoke run of the packed train_gpt.py logged no finite final val_bpb")
    return SmokeResult(seconds, size, artifact.stat().st_size, parsed["final_val_bpb"])


# -----------------------------------------------------------------------------------------------------------------
# submission.json and README.md
# -----------------------------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _r(x: float | None, nd: int = 8) -> float | None:
    return None if x is None else round(x, nd)


def compliance(runs: list[Run], bytes_code: int) -> dict[str, bool | None]:
    """The P-style compliance block, from the logs. score_first_ttt is None when no TTT ran."""
    hps = [r.parsed["hyperparameters"] for r in runs]
    labels = [label for r in runs for label in r.parsed["evals"]]

    def flag_off(word: str) -> bool:  # no enabled hyperparameter mentions the technique
        return not any(word in k.lower() and v not in (False, 0, None, "", "0") for hp in hps for k, v in hp.items())

    ttt_ran = any("ttt" in label for label in labels)
    return {
        "train_under_600s": all(r.parsed["time_totals"]["train"] <= TIME_LIMIT_S for r in runs),
        "eval_under_600s": all(r.parsed["time_totals"]["eval"] <= TIME_LIMIT_S for r in runs),
        "artifact_under_16mb": all(bytes_code + r.artifact_bytes <= ARTIFACT_LIMIT_BYTES for r in runs),
        # eval_ttt scores each chunk under no_grad before adapting on it (tests/test_ttt_legality.py)
        "score_first_ttt": True if ttt_ran else None,
        "no_slot": flag_off("slot"),
        "no_pre_quant_ttt": not any("ttt" in label and not label.startswith("quantized") for label in labels),
        "no_etlb": flag_off("etlb"),
        "no_ngram_cache": flag_off("ngram"),
        "three_seeds": len(runs) >= 3,
    }


def submission(runs: list[Run], args: argparse.Namespace, bytes_code: int, hw: str) -> dict[str, Any]:
    bpbs = [r.parsed["final_val_bpb"] for r in runs]
    losses = [r.parsed["final_val_loss"] for r in runs]
    arts = [r.artifact_bytes for r in runs]
    bpb, bpb_std = _mean_std(bpbs)
    loss, loss_std = _mean_std(losses)
    torch_versions = sorted({r.parsed["torch_version"] or "unknown" for r in runs})
    return {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "date": args.date,
        "track": args.track,
        "blurb": args.blurb or args.name,
        "val_bpb": _r(bpb),
        "val_bpb_std": _r(bpb_std),
        "val_loss": _r(loss),
        "val_loss_std": _r(loss_std),
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): {
            "val_bpb": r.parsed["final_val_bpb"],
            "val_loss": r.parsed["final_val_loss"],
            "artifact_bytes": r.artifact_bytes,
            "steps": r.parsed["steps"],
            "step_avg_ms": _r(r.parsed["step_avg_ms"], 2),
            "train_time_s": r.parsed["time_totals"]["train"],
            "eval_time_s": r.parsed["time_totals"]["eval"],
        } for r in runs},
        "bytes_code": bytes_code,
        "bytes_total": max(bytes_code + a for a in arts),
        "artifact_bytes_mean": _r(statistics.fmean(arts), 1),
        "artifact_bytes_max": max(arts),
        "hardware": hw,
        "pytorch_version": ", ".join(torch_versions),
        "compliance": compliance(runs, bytes_code),
    }


def included_files_section(files: list[str]) -> str:
    """README's `## Included files` section for the files a folder actually holds (tools/submit.py rewrites it)."""
    what = {
        "train_gpt.py": "the packed script that ran and is counted (lzma + base85 self-extracting)",
        "train_gpt_readable.py": "the same code, readable (quant/ inlined; AST-equivalent to the packed file)",
        "submission.json": "results and metadata, generated from the logs",
        "requirements.txt": "Python packages",
        "README.md": "this file",
    }
    lines = []
    for f in files:
        if f in what:
            lines.append(f"- `{f}`: {what[f]}")
        elif m := re.fullmatch(r"train_seed(\d+)\.log", f):
            lines.append(f"- `{f}`: training log of seed {m[1]} (starts with the source that ran)")
        elif m := re.fullmatch(r"final_model_seed(\d+)\.int6\.ptz", f):
            lines.append(f"- `{f}`: the quantized artifact of seed {m[1]}")
        else:
            lines.append(f"- `{f}`")
    return "## Included files\n\n" + "\n".join(lines) + "\n"


def readme(sub: dict[str, Any], runs: list[Run], overrides: dict[str, str], files: list[str], readable_bytes: int,
           world_size: int) -> str:
    def cell(r: Run, label: str) -> float | None:
        return r.parsed["evals"].get(label, {}).get("val_bpb")

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    cols = [("pre-quantization post-ema", "Pre-quant"), ("quantized", "Quantized"),
            ("quantized_sliding_window", "Sliding"), ("quantized_ttt", "TTT")]
    n = len(runs)
    title = "Record" if sub["track"] == "10min_16mb" else "Non-record"
    std = f"std {sub['val_bpb_std']:.4f}" if sub["val_bpb_std"] is not None else "std n/a"
    out = [f"# {title}: {sub['name']}", "",
           f"**val_bpb = {sub['val_bpb']:.4f} ({n}-seed mean, {std}) | {sub['bytes_total'] / 1e6:.2f} MB | "
           f"{sub['hardware']}**", "", sub["blurb"], "",
           f"Track `{sub['track']}`, {sub['date']}, by {sub['author']} (@{sub['github_id']}). "
           f"Final score: `{runs[0].parsed['final_label']}`.", "", "## Results", "",
           "| Seed | Steps | ms/step | " + " | ".join(c[1] for c in cols) + " | Artifact bytes |",
           "|---:|---:|---:|" + "---:|" * len(cols) + "---:|"]
    for r in runs:
        out.append(f"| {r.seed} | {r.parsed['steps']} | {fmt(r.parsed['step_avg_ms'], '.2f')} | "
                   + " | ".join(fmt(cell(r, c[0]), ".8f") for c in cols) + f" | {r.artifact_bytes:,} |")
    for name, fn in (("Mean", statistics.fmean), ("Std", statistics.stdev)):
        if name == "Std" and n < 2:
            break

        def agg(values: list[float | None], spec: str, fn=fn) -> str:
            return "-" if None in values else format(fn(values), spec)
        out.append(f"| **{name}** | {agg([r.parsed['steps'] for r in runs], '.0f')} | "
                   f"{agg([r.parsed['step_avg_ms'] for r in runs], '.2f')} | "
                   + " | ".join(agg([cell(r, c[0]) for r in runs], ".8f") for c in cols)
                   + f" | {agg([float(r.artifact_bytes) for r in runs], ',.0f')} |")
    c = sub["compliance"]
    ttt = c["score_first_ttt"]
    out += ["", "## Compliance", "",
            "The four conditions of issue #1017 (\"A Field Guide to Valid Submissions\"):", "",
            "1. **Causality**: every position is scored from its prefix only (causal attention; the sliding window "
            "only adds left context).",
            "2. **Normalized distribution**: a full softmax over the whole vocabulary; no n-gram cache, no logit "
            "bias (ETLB), no SLOT.",
            "3. **Score before update**: " + ("score-first TTT: each chunk is scored under `no_grad` and added to the "
                                              "totals before any optimizer step on it." if ttt else "no test-time "
                                              "training; the artifact's weights never change during eval."),
            "4. **Single pass**: each val token is scored exactly once in the reported stage; no rescoring.", "",
            "| Seed | Train s (loop + Hessians) | Eval s (sliding + TTT) | Code + artifact bytes |",
            "|---:|---:|---:|---:|"]
    for r in runs:
        t = r.parsed["time_totals"]
        out.append(f"| {r.seed} | {t['train']:.1f} | {t['eval']:.1f} | {sub['bytes_code'] + r.artifact_bytes:,} |")
    out += ["", f"Limits: train ≤ 600 s, eval ≤ 600 s, code + artifact ≤ 16,000,000 bytes on every seed. "
            f"Code is the packed `train_gpt.py` ({sub['bytes_code']:,} bytes; the readable source is "
            f"{readable_bytes:,} bytes). Checks: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in c.items()) + ".",
            "", "## Reproduce", "",
            "```bash", f"SEED={runs[0].seed} torchrun --standalone --nproc_per_node={world_size} train_gpt.py", "```",
            "", f"Seeds run: {', '.join(str(r.seed) for r in runs)}."]
    if overrides:
        env = " ".join(f"{k}={v}" for k, v in overrides.items())
        out += ["", "These runs used env overrides: the record's Config defaults differ from what ran. "
                "To rerun exactly what was measured:", "", "```bash",
                f"{env} SEED={runs[0].seed} torchrun --standalone --nproc_per_node={world_size} train_gpt.py", "```"]
    out += ["", included_files_section(files)]
    return "\n".join(out)


# -----------------------------------------------------------------------------------------------------------------
# folder
# -----------------------------------------------------------------------------------------------------------------

def slug(name: str) -> str:
    """CamelCase slug of a record name: "SP8192 legal-TTT qk5" -> "SP8192LegalTTTQk5"."""
    words = re.findall(r"[A-Za-z0-9]+", name)
    if not words:
        raise RecordError(f"--name {name!r} has no letters or digits to make a folder name from")
    return "".join(w[0].upper() + w[1:] for w in words)


def write_folder(out: Path, texts: dict[str, str], copies: dict[str, Path]) -> None:
    """Write every file into a temporary sibling directory, then rename it to `out` (all or nothing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, src in copies.items():
            shutil.copyfile(src, tmp / name)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(args: argparse.Namespace) -> Path:
    if args.track not in TRACKS:
        raise RecordError(f"--track {args.track}: use one of {', '.join(TRACKS)}")
    if len(args.log) != len(args.artifact):
        raise RecordError(f"--log and --artifact come in pairs: got {len(args.log)} logs, {len(args.artifact)} artifacts")
    pairs = [run_from_dir(d) for d in args.run] + list(zip(args.log, args.artifact))
    if not pairs:
        raise RecordError("no runs: pass --run OUT_DIR or --log LOG --artifact ARTIFACT (one per seed)")
    try:
        dt.date.fromisoformat(args.date)
    except ValueError:
        raise RecordError(f"--date {args.date!r}: use YYYY-MM-DD") from None
    out = args.out or ROOT / "records" / f"track_{args.track}" / f"{args.date}_{slug(args.name)}"
    if out.exists():
        raise RecordError(f"{out} already exists; remove it or pass another --out")
    runs = [load_run(log, art) for log, art in pairs]
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise RecordError(f"duplicate seeds among the runs: {seeds}")
    hw, is_8xh100 = hardware(runs)
    if args.track == "10min_16mb" and not is_8xh100:
        raise RecordError(f"track 10min_16mb needs 8xH100 logs; these ran on {hw}: use --track non_record_16mb")

    sources = common_sources(runs)
    changed = sorted(n for n, s in sources.items() if not (ROOT / n).is_file() or (ROOT / n).read_text() != s)
    if changed:
        print(f"note: the working tree differs from the logged sources in {', '.join(changed)}; "
              f"the record is built from the logs (the code that ran)")
    readable = inline_quant(sources)
    packed = pack(readable)
    check_equivalent(readable, packed)
    size, readable_size = len(packed.encode("utf-8")), len(readable.encode("utf-8"))
    print(f"code: readable {readable_size:,} bytes -> packed {size:,} bytes (AST-equivalent)")
    with tempfile.TemporaryDirectory(prefix="pgolf_smoke_") as work:
        smoke = smoke_run(packed, Path(work))
    print(f"smoke run of the packed file: {smoke.seconds:.1f} s, bytes_code:{smoke.bytes_code} "
          f"bytes_model:{smoke.bytes_model} val_bpb:{smoke.val_bpb:.4f}")

    overrides = config_overrides(runs, config_defaults(readable))
    sub = submission(runs, args, size, hw)
    texts = {"train_gpt.py": packed}
    copies: dict[str, Path] = {}
    if not args.upstream:
        texts["train_gpt_readable.py"] = readable
    for r in runs:
        copies[f"train_seed{r.seed}.log"] = r.log_path
        if not args.upstream:
            copies[f"final_model_seed{r.seed}.int6.ptz"] = r.artifact_path
    texts["submission.json"] = json.dumps(sub, indent=2) + "\n"
    texts["requirements.txt"] = (ROOT / "requirements.txt").read_text()
    files = ["README.md", *texts, *copies]
    world_size = runs[0].parsed["world_size"] or 8
    texts["README.md"] = readme(sub, runs, overrides, files, readable_size, world_size)
    write_folder(out, texts, copies)
    worst = max(size + r.artifact_bytes for r in runs)
    print(f"wrote {out}: {len(runs)} seeds, val_bpb {sub['val_bpb']:.8f}, max bytes {worst:,} / {ARTIFACT_LIMIT_BYTES:,}")
    if overrides:
        print(f"note: the runs overrode Config defaults ({', '.join(overrides)}); the README lists them")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build a record folder (packed + readable train_gpt.py, logs, artifacts, "
                                             "submission.json, README.md) from finished runs.")
    ap.add_argument("--run", type=Path, action="append", default=[],
                    help="a run's OUT_DIR (logs/<RUN_ID>.txt, final_model.int6.ptz, run_summary.json); once per seed")
    ap.add_argument("--log", type=Path, action="append", default=[], help="a run's log file (pair with --artifact)")
    ap.add_argument("--artifact", type=Path, action="append", default=[], help="that run's final_model.int6.ptz")
    ap.add_argument("--name", required=True, help="the record's name (title; the folder slug is its CamelCase)")
    ap.add_argument("--track", required=True, choices=TRACKS, help="10min_16mb (8xH100 record) or non_record_16mb")
    ap.add_argument("--author", default=UNKNOWN, help=f"author's name for submission.json (default {UNKNOWN!r}; "
                    f"tools/submit.py refuses it)")
    ap.add_argument("--github-id", default=UNKNOWN, help=f"author's GitHub id for submission.json (default {UNKNOWN!r})")
    ap.add_argument("--blurb", default="", help="one-paragraph summary (default: the name)")
    ap.add_argument("--date", default=dt.date.today().isoformat(), help="record date YYYY-MM-DD (default: today)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: records/track_<track>/<date>_<Slug>/); must not exist")
    ap.add_argument("--upstream", action="store_true",
                    help="upstream PR layout: no readable twin and no artifacts in the folder")
    args = ap.parse_args(argv)
    try:
        build(args)
    except RecordError as e:
        print(f"build_record.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
