"""Inline the local modules train_gpt.py imports (data/shards.py, evals/, quant/) into it, append an experiment's
entry script (experiments/<name>.py) when the run was one, pack the result into the self-extracting 2-line script,
unpack it again, and compare sources modulo docstrings and annotations (docs/records.md "Packing", "Packing
experiments").

The packed form is PR #1394's lineage: AST without docstrings (and without function-signature annotations when nothing
reads them), ast.unparse, raw LZMA2 + base85 inside `exec(L.decompress(B.b85decode("...")...))`.
"""

from __future__ import annotations

import ast
import base64
import functools
import io
import lzma
import re
import sys
import tokenize
from collections.abc import Iterable

MARKERS = ("# >>> inline local modules", "# <<< inline local modules")
LEGACY_MARKERS = ("# >>> inline quant", "# <<< inline quant")  # logs of runs from before data/shards.py was a module
LOCAL_PACKAGES = ("data", "evals", "quant")  # repo packages whose modules a run logs and a record inlines
ENTRY_PACKAGE = "experiments"  # entry scripts: experiments/<name>.py runs instead of train_gpt.py and imports it
# The self-extracting wrapper of record P (PR #1394 lineage): raw LZMA2 saves the xz container's ~60 bytes.
WRAP_HEAD = 'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("'
WRAP_TAIL = '"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n'
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
READS_ANNOTATIONS = re.compile(r"__annotations__|get_type_hints|\bsignature\(|annotationlib")


class RecordError(Exception):
    """A user-facing problem with the inputs or the build: printed as one line, exit status 1."""


# -----------------------------------------------------------------------------------------------------------------
# inline the local modules (data/shards.py, evals/*.py, quant/*.py) into train_gpt.py
# -----------------------------------------------------------------------------------------------------------------

def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _parse(src: str, name: str) -> ast.Module:
    try:
        return ast.parse(src, filename=name)
    except SyntaxError as e:
        raise RecordError(f"{name}: does not parse ({e.msg}, line {e.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes, absurd nesting
        raise RecordError(f"{name}: does not parse ({type(e).__name__}: {str(e)[:80]})") from None


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


def _imported_modules(node: ast.AST) -> list[str]:
    """Absolute module names an import statement names (`from a.b import c` -> a.b; `import x, y` -> x, y)."""
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return [node.module or ""]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def _imports_of(tree: ast.AST, tops: tuple[str, ...]) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement (at any depth) of a module whose top-level package is in `tops`."""
    return [node for node in ast.walk(tree)
            if any(m.split(".")[0] in tops for m in _imported_modules(node))]


def _local_file(module: str) -> str:
    """`quant.codec` -> `quant/codec.py`: the logged source a local module import refers to."""
    return module.replace(".", "/") + ".py"


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


class _ImportBlock:
    """The merged top-level imports of the files put into one module (a name bound twice must mean one thing)."""

    def __init__(self) -> None:
        self.plain: set[tuple[str, str | None]] = set()
        self.froms: dict[str, set[tuple[str, str | None]]] = {}
        self.bound: dict[str, tuple[str, str]] = {}  # imported name -> (target, file)

    def add(self, node: ast.Import | ast.ImportFrom, where: str) -> None:
        for name, target in _bound_imports(node).items():
            if name in self.bound and self.bound[name][0] != target:
                raise RecordError(f"import clash: {where} binds {name} to {target}, {self.bound[name][1]} to "
                                  f"{self.bound[name][0]}")
            self.bound[name] = (target, where)
        if isinstance(node, ast.Import):
            self.plain.update((a.name, a.asname) for a in node.names)
        else:
            self.froms.setdefault(node.module, set()).update((a.name, a.asname) for a in node.names)

    def text(self) -> str:
        return format_imports(self.plain, self.froms)


def _module_order(mods: dict[str, ast.Module]) -> list[str]:
    """Local module files in dependency order (a module after every local module it imports from); ties by name.
    A module may import only `from <package>.<module> import name` of another inlined module, and never train_gpt."""
    deps = {}
    for fname, tree in mods.items():
        deps[fname] = set()
        if bad := _imports_of(tree, ("train_gpt",)):
            raise RecordError(f"{fname}: `{ast.unparse(bad[0])}` cannot be inlined (train_gpt.py is what it is "
                              f"inlined into)")
        for node in _imports_of(tree, LOCAL_PACKAGES):
            if node not in tree.body:
                raise RecordError(f"{fname} line {node.lineno}: `{ast.unparse(node)}` is not at top level (an inlined "
                                  f"module can import another only at top level)")
            target = _local_file(node.module) if isinstance(node, ast.ImportFrom) and "." in node.module else None
            if target is None or target not in mods:
                raise RecordError(f"{fname}: `{ast.unparse(node)}` cannot be inlined (only `from <package>.<module> "
                                  f"import name` of another inlined module is supported)")
            deps[fname].add(target)
    order: list[str] = []
    while len(order) < len(mods):
        ready = sorted(n for n in mods if n not in order and deps[n] <= set(order))
        if not ready:
            raise RecordError(f"local modules import each other in a cycle: {sorted(set(mods) - set(order))}")
        order.append(ready[0])
    return order


def _markers(lines: list[str]) -> tuple[str, str, list[int], list[int]]:
    """(begin, end, begin lines, end lines) of the inline block; logs of older runs carry LEGACY_MARKERS."""
    found = [(m, [i for i, line in enumerate(lines) if line.startswith(m[0])],
              [i for i, line in enumerate(lines) if line.startswith(m[1])]) for m in (MARKERS, LEGACY_MARKERS)]
    used = [f for f in found if f[1] or f[2]]
    if len(used) > 1:
        raise RecordError(f"train_gpt.py must have exactly one inline block; it has both `{MARKERS[0]}` and "
                          f"`{LEGACY_MARKERS[0]}` markers")
    (begin, end), begins, ends = used[0] if used else found[0]
    return begin, end, begins, ends


def _check_init(name: str, src: str) -> None:
    """A package's __init__.py is inlined as nothing: it may only re-export (docstring, imports, __all__)."""
    for node in _parse(src, name).body:
        is_all = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        if not (_is_docstring(node) or is_all or isinstance(node, ast.ImportFrom)):
            raise RecordError(f"{name} line {node.lineno}: only re-exports can be inlined")


def inline_modules(sources: dict[str, str]) -> str:
    """The readable single-file program of a run's logged sources: train_gpt.py with its local modules inlined
    (`_inline_local`), then, for an experiment run, its entry script appended in place of train_gpt.py's
    `if __name__ == "__main__":` block (`_append_entry`)."""
    entry = entry_script(sources)
    if entry is None:
        return _inline_local(sources)
    return _append_entry(_inline_local({n: s for n, s in sources.items() if n != entry}), entry, sources[entry])


def _inline_local(sources: dict[str, str]) -> str:
    """The readable single-file train_gpt.py: the logged local modules (data/*.py, evals/*.py, quant/*.py; not __init__)
    inlined at the marked import block in dependency order, their imports hoisted and merged into train_gpt.py's
    import block, the local-module imports and `__all__` dropped."""
    if "train_gpt.py" not in sources:
        raise RecordError(f"no train_gpt.py among the logged sources ({sorted(sources)})")
    main_src = sources["train_gpt.py"]
    local_files = {n: s for n, s in sources.items()
                   if n.count("/") == 1 and n.endswith(".py") and n.split("/")[0] in LOCAL_PACKAGES}
    others = sorted(set(sources) - set(local_files) - {"train_gpt.py"})
    if others:
        raise RecordError(f"logged sources {others} are neither train_gpt.py nor modules of "
                          f"{', '.join(p + '/' for p in LOCAL_PACKAGES[:-1])} or {LOCAL_PACKAGES[-1]}/; cannot inline them")
    lines = _src_lines(main_src)
    mark_begin, mark_end, begins, ends = _markers(lines)
    if not local_files:
        if begins or ends:
            raise RecordError("train_gpt.py has the inline block but the log holds no local module sources "
                              f"({', '.join(p + '/' for p in LOCAL_PACKAGES)})")
        return unpack(main_src) if is_packed(main_src) else main_src
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise RecordError(f"train_gpt.py must have exactly one `{mark_begin}` ... `{mark_end}` block "
                          f"(found {len(begins)} begin and {len(ends)} end markers)")
    b, e = begins[0] + 1, ends[0] + 1  # 1-based line numbers of the markers
    tree = _parse(main_src, "train_gpt.py")

    # the marked block: `from <package>[.<module>] import ...` of the local packages only
    wanted: list[tuple[str, str]] = []  # (name, module it is imported from)
    block = [n for n in tree.body if b < n.lineno < e]
    for node in block:
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.split(".")[0] in LOCAL_PACKAGES):
            raise RecordError(f"train_gpt.py line {node.lineno}: only `from <package>[.<module>] import ...` of "
                              f"{', '.join(LOCAL_PACKAGES)} may sit in the inline block")
        for a in node.names:
            if a.asname and a.asname != a.name:
                raise RecordError(f"train_gpt.py line {node.lineno}: `{a.name} as {a.asname}`: aliases are not inlined")
            wanted.append((a.name, node.module))
    stray = [n for n in _imports_of(tree, LOCAL_PACKAGES) if not b < n.lineno < e]
    if stray:
        raise RecordError(f"train_gpt.py line {stray[0].lineno}: `{ast.unparse(stray[0])}` imports a local module "
                          f"outside the inline block")

    # train_gpt.py's own import block: the imports between `from __future__` and the marker
    head = [n for n in tree.body if n.lineno < b and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    if head and _is_docstring(head[0]) and head[0] is tree.body[0]:
        head = head[1:]
    if not head or not all(isinstance(n, ast.Import | ast.ImportFrom) for n in head):
        raise RecordError("train_gpt.py: only imports may come between `from __future__ import annotations` and the "
                          "inline block (the builder merges the inlined modules' imports into them)")
    first_import = head[0].lineno

    # local modules: bodies without docstring, imports, __all__
    for name in sorted(n for n in local_files if n.endswith("/__init__.py")):
        _check_init(name, local_files.pop(name))
    mods = {n: _parse(s, n) for n, s in local_files.items()}
    order = _module_order(mods)
    imports = _ImportBlock()
    for node in head:
        imports.add(node, "train_gpt.py")
    main_rest = [n for n in tree.body if n.lineno > e]
    defined = {name: "train_gpt.py" for name in _top_level_names(main_rest)}
    chunks: list[str] = []
    needs: list[tuple[str, str, str]] = []  # (name, defining file, importing file) between local modules
    for fname in order:
        src_lines = _src_lines(local_files[fname])
        drop: set[int] = set()
        body = mods[fname].body
        doc = ""
        kept_nodes = []
        for i, node in enumerate(body):
            is_all = isinstance(node, ast.Assign | ast.AnnAssign) and any(
                isinstance(t, ast.Name) and t.id == "__all__"
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
            if i == 0 and _is_docstring(node):
                doc = node.value.value
            elif isinstance(node, ast.Import | ast.ImportFrom):
                if _imports_of(node, LOCAL_PACKAGES):
                    needs += [(a.name, _local_file(node.module), fname) for a in node.names]
                elif not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                    imports.add(node, fname)
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
    for name, module in sorted(set(wanted)):
        where = defined.get(name, "train_gpt.py")
        if not (where == _local_file(module) or where.startswith(module + "/")):
            raise RecordError(f"train_gpt.py imports `{name}` from {module} but no inlined {module} module defines it")
    clash = sorted(set(defined) & set(imports.bound))
    if clash:
        raise RecordError(f"name clash: `{clash[0]}` is both imported and defined at top level ({defined[clash[0]]})")

    inlined = (f"{mark_begin}: {', '.join(order)} (inlined by tools/build_record.py)\n\n"
               + "\n\n\n".join(chunks) + f"\n\n\n{mark_end}")
    out = lines[:first_import - 1] + [imports.text(), "", inlined] + lines[e:]
    text = "\n".join(out) + "\n"
    _parse(text, "train_gpt_readable.py")
    return text


# -----------------------------------------------------------------------------------------------------------------
# an experiment's entry script (experiments/<name>.py) appended to the inlined train_gpt.py
# -----------------------------------------------------------------------------------------------------------------

ENTRY_MODULE_LINE = "train_gpt = sys.modules[__name__]  # packed: train_gpt is this very file"


def entry_script(names: Iterable[str]) -> str | None:
    """The one logged experiments/<name>.py (the run's entry script), or None for a plain train_gpt.py run."""
    under = sorted(n for n in names if n.split("/")[0] == ENTRY_PACKAGE)
    bad = [n for n in under if n.count("/") != 1 or not n.endswith(".py") or n.endswith("/__init__.py")]
    if bad:
        raise RecordError(f"logged source {bad[0]} is not an entry script: only {ENTRY_PACKAGE}/<name>.py is packed "
                          f"(a run logs its entry file alone)")
    if len(under) > 1:
        raise RecordError(f"two entry scripts among the logged sources ({', '.join(under)}); a record packs one")
    return under[0] if under else None


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'", "'__main__' == __name__")


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
               for n in tree.body)


def _entry_imports(tree: ast.Module, entry: str) -> list[ast.Import | ast.ImportFrom]:
    """The entry's top-level imports to hoist (not `__future__`, not `import train_gpt`). An entry reaches train_gpt
    and its modules only through one top-level, unaliased `import train_gpt`."""
    local = (ENTRY_PACKAGE, "train_gpt", *LOCAL_PACKAGES)
    for node in ast.walk(tree):
        relative = isinstance(node, ast.ImportFrom) and node.level > 0
        if relative or any(m.split(".")[0] in local for m in _imported_modules(node)):
            plain = isinstance(node, ast.Import) and [(a.name, a.asname) for a in node.names] == [("train_gpt", None)]
            if relative or not plain or node not in tree.body:
                raise RecordError(f"{entry} line {node.lineno}: `{ast.unparse(node)}` cannot be packed (an entry "
                                  f"script reaches the trainer only through a top-level `import train_gpt`, as "
                                  f"`train_gpt.<name>`)")
    return [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom) and not _imports_of(n, ("train_gpt",))
            and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]


def _append_entry(base: str, entry: str, src: str) -> str:
    """The inlined train_gpt.py without its final `if __name__ == "__main__":` block, then the entry script: its
    docstring as a comment header, its imports merged into the import block (with `import sys`), `import train_gpt`
    as `train_gpt = sys.modules[__name__]`, its body, and its own `if __name__ == "__main__":` block last."""
    tree, etree = _parse(base, "train_gpt.py"), _parse(src, entry)
    if not tree.body or not _is_main_guard(tree.body[-1]):
        raise RecordError('train_gpt.py does not end with an `if __name__ == "__main__":` block (the entry script\'s '
                          'replaces it)')
    if not etree.body or not _is_main_guard(etree.body[-1]):
        raise RecordError(f'{entry} does not end with an `if __name__ == "__main__":` block (an entry script must)')
    if _has_future_annotations(tree) and not _has_future_annotations(etree):
        raise RecordError(f"{entry} lacks `from __future__ import annotations` (packed into train_gpt.py, which has "
                          f"it, its annotations would change meaning)")
    hoisted = _entry_imports(etree, entry)
    uses_trainer = any(_imports_of(n, ("train_gpt",)) for n in etree.body)

    # train_gpt.py's import block: the top-level imports right after its docstring and `from __future__`
    i = 1 if _is_docstring(tree.body[0]) else 0
    while i < len(tree.body) and isinstance(tree.body[i], ast.ImportFrom) and tree.body[i].module == "__future__":
        i += 1
    j = i
    while j < len(tree.body) and isinstance(tree.body[j], ast.Import | ast.ImportFrom):
        j += 1
    if i == j:
        raise RecordError("train_gpt.py has no import block after its docstring (the entry's imports merge into it)")
    imports = _ImportBlock()
    for node in tree.body[i:j]:
        imports.add(node, "train_gpt.py")
    theirs = _top_level_names(tree.body[j:-1]) | set(imports.bound)  # the guard block is dropped
    imports.add(ast.Import(names=[ast.alias("sys")]), "the packer (train_gpt = sys.modules[__name__])")
    for node in hoisted:
        imports.add(node, entry)
        if clash := sorted(set(_bound_imports(node)) & _top_level_names(tree.body[j:-1])):
            raise RecordError(f"name clash: {entry} imports `{clash[0]}`, which train_gpt.py (with its inlined "
                              f"modules) defines at top level; import it under another name")
    body = [n for k, n in enumerate(etree.body) if not (k == 0 and _is_docstring(n))
            and not isinstance(n, ast.Import | ast.ImportFrom)]
    mine = _top_level_names(body) | ({"train_gpt"} if uses_trainer else set())
    if clash := sorted(mine & theirs):
        raise RecordError(f"name clash: {entry} defines `{clash[0]}` at top level and so does train_gpt.py (with its "
                          f"inlined modules); rename it in the entry (a record is one namespace)")

    drop: set[int] = set()
    for k, node in enumerate(etree.body):
        if (k == 0 and _is_docstring(node)) or isinstance(node, ast.Import | ast.ImportFrom):
            drop.update(range(node.lineno, node.end_lineno + 1))
    doc = etree.body[0].value.value if _is_docstring(etree.body[0]) else ""
    kept = "\n".join(line for n, line in enumerate(_src_lines(src), 1) if n not in drop)
    kept = re.sub(r"\n{3,}", "\n\n\n", kept).strip("\n")
    header = f"# ---- {entry} (the entry script)" + "".join(f"\n# {line}".rstrip() for line in doc.strip().splitlines())
    lines = _src_lines(base)
    start, end = tree.body[i].lineno, tree.body[j - 1].end_lineno
    trainer = "\n".join(lines[:start - 1] + [imports.text()] + lines[end:tree.body[-1].lineno - 1]).rstrip()
    own = f"{ENTRY_MODULE_LINE}\n\n\n" if uses_trainer else ""
    text = f"{trainer}\n\n\n{header}\n\n{own}{kept}\n"
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
