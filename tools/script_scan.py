"""What a record's script can do, read statically (docs/rules.md "What the script may do").

The scan describes; it does not decide. Every capability it finds (network, processes, dynamic code, native code,
code read from beside the script) is reported with its line, and the sandbox run (tools/sandbox.py) decides.
Self-extracting wrappers are decoded first, including variants with extra lines around the `exec`, nested wrappers,
and a payload held in a variable. A script the running Python cannot parse (PEP 701 f-strings need 3.12) is parsed
by a newer interpreter when one is installed, else scanned token by token.

Stdlib only, so `python3.X tools/script_scan.py FILE` can run it under another interpreter's grammar.
"""

from __future__ import annotations

import ast
import base64
import bz2
import functools
import gzip
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tokenize
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

DECOMPRESS = {"lzma": lzma.decompress, "zlib": zlib.decompress, "bz2": bz2.decompress, "gzip": gzip.decompress}
TEXT_DECODE = {"b85decode", "b64decode", "a85decode", "b32decode", "b16decode", "urlsafe_b64decode", "decodebytes"}
MAX_DEPTH = 4

NETWORK_MODULES = {"socket", "ssl", "http", "urllib", "urllib3", "requests", "httpx", "aiohttp", "ftplib", "smtplib",
                   "poplib", "imaplib", "nntplib", "telnetlib", "xmlrpc", "socketserver", "websocket", "websockets",
                   "paramiko", "huggingface_hub", "wandb", "boto3", "webbrowser"}
NETWORK_ATTRS = {"urlopen", "urlretrieve", "DataSource", "TCPStore", "hf_hub_download", "snapshot_download",
                 "load_state_dict_from_url", "download_url_to_file", "create_connection", "getaddrinfo", "hub",
                 "model_zoo", "init_process_group"}
PROCESS_MODULES = {"pty", "multiprocessing", "asyncio"}  # subprocess: its calls are judged one by one
PROCESS_ATTRS = {"system", "popen", "Popen", "posix_spawn", "posix_spawnp", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execl", "execle", "execlp", "execlpe", "execv",
                 "execve", "execvp", "execvpe", "fork", "forkpty", "startfile", "check_output", "check_call",
                 "getoutput", "getstatusoutput", "create_subprocess_exec", "create_subprocess_shell"}
DYNAMIC_NAMES = {"exec", "eval", "compile", "__import__", "__builtins__", "breakpoint", "globals", "vars", "locals",
                 "getattr", "setattr", "delattr"}
DYNAMIC_MODULES = {"importlib", "runpy", "imp", "zipimport", "pkgutil", "code", "codeop", "builtins", "marshal",
                   "pickle", "dill", "cloudpickle", "shelve", "types", "inspect"}
DYNAMIC_ATTRS = {"import_module", "run_path", "run_module", "exec_module", "load_module", "loads", "load",
                 "FunctionType", "CodeType", "LambdaType", "Unpickler", "find_class", "__getattribute__", "__dict__",
                 "__globals__", "__code__", "__subclasses__", "__reduce__", "spec_from_file_location"}
NATIVE_MODULES = {"ctypes", "_ctypes", "cffi"}
NATIVE_ATTRS = {"load_library", "cpp_extension", "load_inline", "CDLL", "PyDLL", "LoadLibrary", "dlopen", "cdll"}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_output", "check_call", "getoutput", "getstatusoutput"}
KNOWN_INFO_MODULES = {"triton", "subprocess"}  # JIT kernels from an installed package: upstream allows them
ALLOWED_EXECUTABLES = {"nvidia-smi", "lrzip", "xz", "zstd", "brotli", "gzip", "bzip2", "lzma", "pigz", "lz4", "zpaq"}
# Used by every upstream trainer: a `getattr(module, literal)` or `.load(...)` on torch is not dynamic code.
SAFE_DYNAMIC = {"getattr", "load", "loads", "modules", "types"}
# objects whose attributes looked up by a computed name could be anything (a module's `system`, a builtin)
RISKY_BASES = (NETWORK_MODULES | PROCESS_MODULES | DYNAMIC_MODULES | NATIVE_MODULES
               | {"os", "sys", "posix", "subprocess", "shutil", "io", "builtins", "__builtins__"})
CODE_SUFFIX = re.compile(r"\.(?:py|pyc|pyw|pyz|so|pyd|zip|egg|whl|pth)$", re.I)


@dataclass(frozen=True)
class Finding:
    line: int
    kind: str  # network, process, dynamic, native, code_file, info
    what: str


@dataclass
class Scan:
    """The decoded source and what it can do."""
    wrapper: str  # "plain", or the wrapper chain ("lzma+b85 exec wrapper")
    inner: str | None  # the decoded source (None if a wrapper did not decode)
    parsed_with: str  # "ast (Python 3.11)", "ast (python3.13)", "tokens", or "none"
    parse_error: str | None = None
    findings: list[Finding] = field(default_factory=list)
    code_refs: list[str] = field(default_factory=list)  # sibling names the script imports, execs or reads as code
    python: str | None = None  # the newer interpreter whose grammar parsed it (the sandbox runs it there too)


# -----------------------------------------------------------------------------------------------------------------
# wrappers
# -----------------------------------------------------------------------------------------------------------------

class _Eval:
    """Evaluates the tiny expression language of exec wrappers: module aliases, literals, decompress/decode calls."""

    def __init__(self, tree: ast.Module):
        self.aliases: dict[str, str] = {}
        self.consts: dict[str, Any] = {}
        for node in tree.body:
            if isinstance(node, ast.Import):
                self.aliases.update({a.asname or a.name: a.name for a in node.names})
            elif isinstance(node, ast.ImportFrom) and node.module:
                self.aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    self.consts[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass

    def func(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in self.aliases:
            return f"{self.aliases[node.value.id]}.{node.attr}"
        if isinstance(node, ast.Name) and node.id in self.aliases:
            return self.aliases[node.id]
        return None

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Name) and node.id in self.consts:
            return self.consts[node.id]
        if isinstance(node, ast.Attribute) and self.func(node) and self.func(node).startswith("lzma."):
            return getattr(lzma, node.attr)
        if isinstance(node, ast.List):
            return [self.value(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call):
            return self.call(node)
        return ast.literal_eval(node)

    def call(self, node: ast.Call) -> Any:
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("decode", "encode") and not self.func(node.func):
            base = self.value(node.func.value)
            return base.decode("utf-8") if node.func.attr == "decode" else base.encode("utf-8")
        name = self.func(node.func) or ""
        mod, _, attr = name.rpartition(".")
        args = [self.value(a) for a in node.args]
        kwargs = {k.arg: self.value(k.value) for k in node.keywords}
        if mod == "base64" and attr in TEXT_DECODE:
            return getattr(base64, attr)(*args)
        if attr == "decompress" and mod in DECOMPRESS:
            return DECOMPRESS[mod](*args, **kwargs)
        if attr == "decompress" and mod == "brotli":
            import brotli
            return brotli.decompress(*args)
        raise ValueError(f"not a decoding call: {ast.unparse(node)[:60]}")


def _exec_payload(tree: ast.Module) -> tuple[int, ast.Call] | None:
    """(index, call) of the one top-level `exec(<expr>)` statement whose argument is not a plain name."""
    hits = [(i, n.value) for i, n in enumerate(tree.body) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
            and isinstance(n.value.func, ast.Name) and n.value.func.id == "exec" and len(n.value.args) >= 1
            and isinstance(n.value.args[0], ast.Call)]
    return hits[0] if len(hits) == 1 else None


def _file_read(node: ast.AST) -> str | None:
    """The file an expression reads as text (`open(p).read()`, `Path(p).read_text()`, `open(p, 'rb').read()`), named
    from its last literal (`__file__.replace("train_gpt.py", "impl.py")` -> impl.py), else `a file named at run
    time`; None when the expression is not a file read."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("read", "read_text", "read_bytes")):
        return None
    opener = node.func.value
    if node.func.attr == "read" and not (isinstance(opener, ast.Call) and isinstance(opener.func, ast.Name | ast.Attribute)
                                         and (getattr(opener.func, "id", None) or opener.func.attr) == "open"):
        return None
    names = [s for s in _path_literals(opener) if s.endswith(".py") or "/" in s or "." in s]
    return names[-1] if names else "a file named at run time"


def decode_wrappers(text: str, parse: Any = ast.parse) -> tuple[str, str, str | None]:
    """(source, wrapper, error): a self-extracting script's decoded source with the wrapper's other top-level lines
    kept (they run too); nested wrappers decoded up to MAX_DEPTH. `plain` when the script is not a wrapper."""
    kinds: list[str] = []
    src = text
    for _ in range(MAX_DEPTH):
        try:
            tree = parse(src)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            break
        hit = _exec_payload(tree)
        if hit is None:
            break
        i, call = hit
        if (read := _file_read(call.args[0])) is not None:  # exec(open(<sibling>).read()): nothing to decode here
            return src, "+".join([*kinds, f"exec stub of {read} (the code that runs is that file)"]), None
        try:
            decoded = _Eval(tree).value(call.args[0])
            inner = decoded.decode("utf-8") if isinstance(decoded, bytes) else decoded
            if not isinstance(inner, str):
                raise ValueError("payload is not text")
        except Exception as e:  # any failure of the mini-evaluator: the wrapper is not decodable
            return src, "+".join(kinds) or "plain", f"exec wrapper does not decode ({type(e).__name__}: {e})"[:200]
        chain = [n for n in ast.walk(call.args[0]) if isinstance(n, ast.Call)]
        kinds.append("/".join(sorted({(_Eval(tree).func(c.func) or "").split(".")[0] for c in chain} - {""})) or "exec")
        rest = [ast.unparse(n) for j, n in enumerate(tree.body) if j != i and not isinstance(n, ast.Import)
                and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        src = "\n".join([*rest, inner]) if rest else inner
    return src, ("+".join(kinds) + " exec wrapper") if kinds else "plain", None


# -----------------------------------------------------------------------------------------------------------------
# parsing under the right grammar
# -----------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def newer_pythons() -> list[str]:
    """Interpreters on PATH newer than the running one (their grammar accepts what this one may not), newest first.
    Each is asked its version: a pyenv shim of a version that is not selected is on PATH but does not run."""
    major, here = sys.version_info[:2]
    found = []
    for minor in range(19, here, -1):
        exe = shutil.which(f"python{major}.{minor}")
        try:
            out = subprocess.run([exe, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30).stdout.strip() if exe else ""
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out == f"{major}.{minor}":
            found.append(exe)
    return found


def _scan_elsewhere(exe: str, text: str) -> dict[str, Any] | None:
    """Run this module's scan under another interpreter (stdlib only; parsing executes nothing)."""
    try:
        proc = subprocess.run([exe, "-I", "-S", __file__, "-"], input=text, capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return None


# -----------------------------------------------------------------------------------------------------------------
# capabilities
# -----------------------------------------------------------------------------------------------------------------

def _fold(node: ast.AST) -> str | None:
    """A string expression folded from literals (`'sys' + 'tem'`, `''.join(['sy', 'stem'])`), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = _fold(node.left), _fold(node.right)
        return a + b if a is not None and b is not None else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and len(node.args) == 1 and isinstance(node.args[0], ast.List | ast.Tuple)):
        sep, parts = _fold(node.func.value), [_fold(e) for e in node.args[0].elts]
        return sep.join(parts) if sep is not None and None not in parts else None
    return None


def _top(name: str) -> str:
    return name.split(".")[0]


def _literal_argv(node: ast.Call) -> list[str] | None:
    if node.args and isinstance(node.args[0], ast.List | ast.Tuple):
        argv = [_fold(e) for e in node.args[0].elts]
        return argv if argv and None not in argv else None
    return None


class _Capabilities(ast.NodeVisitor):
    def __init__(self, siblings: set[str]):
        self.out: list[Finding] = []
        self.siblings = siblings  # file names beside the script
        self.code_refs: list[str] = []
        self.aliases: dict[str, str] = {}

    def add(self, node: ast.AST, kind: str, what: str) -> None:
        self.out.append(Finding(getattr(node, "lineno", 0), kind, what))

    def _module(self, node: ast.AST, mod: str) -> None:
        top = _top(mod)
        if top in NETWORK_MODULES:
            self.add(node, "network", f"imports {mod}")
        elif top in PROCESS_MODULES:
            self.add(node, "process", f"imports {mod}")
        elif top in DYNAMIC_MODULES:
            self.add(node, "dynamic", f"imports {mod}")
        elif top in NATIVE_MODULES:
            self.add(node, "native", f"imports {mod}")
        elif top in KNOWN_INFO_MODULES:
            self.add(node, "info", f"imports {mod}" + (" (JIT kernels from an installed package)" if top == "triton"
                                                       else " (each call is judged on its own)"))
        for sib in (f"{top}.py", top):
            if sib in self.siblings:
                self.add(node, "code_file", f"imports {mod} from the record folder ({sib})")
                self.code_refs.append(sib)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[a.asname or _top(a.name)] = a.name if a.asname else _top(a.name)
            self._module(node, a.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self.add(node, "code_file", f"relative import from {'.' * node.level}{node.module or ''}")
        mod = node.module or ""
        self._module(node, mod)
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{mod}.{a.name}"
            self._attr(node, a.name, mod)

    def _attr(self, node: ast.AST, attr: str, base: str) -> None:
        top = _top(base)
        if attr in NETWORK_ATTRS and not (attr == "hub" and top not in ("torch", "")) and attr != "init_process_group":
            self.add(node, "network", f"uses {base + '.' if base else ''}{attr}")
        elif attr in PROCESS_ATTRS and top in ("os", "subprocess", "pty", "asyncio", "commands", "", "posix"):
            self.add(node, "process", f"uses {base + '.' if base else ''}{attr}")
        elif attr in NATIVE_ATTRS:
            self.add(node, "native", f"uses {base + '.' if base else ''}{attr}")
        elif attr in DYNAMIC_ATTRS and not (attr in SAFE_DYNAMIC and top in ("torch", "np", "numpy", "json")):
            if attr in ("modules",) and top != "sys":
                return
            if attr in ("loads", "load") and top not in ("pickle", "marshal", "dill", "cloudpickle", "shelve", ""):
                return
            self.add(node, "dynamic", f"uses {base + '.' if base else ''}{attr}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        base = node.value
        chain = []
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        root = self.aliases.get(base.id, base.id) if isinstance(base, ast.Name) else ""
        self._attr(node, node.attr, ".".join([root, *reversed(chain)]).strip("."))
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        key = _fold(node.slice)
        target = ast.unparse(node.value)
        risky = NETWORK_MODULES | PROCESS_MODULES | DYNAMIC_MODULES | NATIVE_MODULES | {"os", "subprocess", "posix"}
        this_module = isinstance(node.slice, ast.Name) and node.slice.id == "__name__"  # a packed entry's `train_gpt`
        if target == "sys.modules" and not this_module and (key is None or _top(key) in risky):
            self.add(node, "dynamic", f"sys.modules[{key if key is None else repr(key)}] (a module without an import)")
        elif target in ("globals()", "vars()", "locals()", "__builtins__", "builtins.__dict__", "__builtins__.__dict__"):
            self.add(node, "dynamic", f"{target}[{key!r}]" if key else f"{target}[<computed>]")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        flagged = DYNAMIC_NAMES - {"getattr", "setattr", "delattr", "globals", "vars", "locals"}
        if isinstance(node.ctx, ast.Load) and node.id in flagged:
            self.add(node, "dynamic", f"uses {node.id}")
        self.generic_visit(node)

    def _resolve(self, f: ast.AST) -> str:
        """Dotted name of a call target through import aliases (`sp.run` -> `subprocess.run`)."""
        parts = []
        while isinstance(f, ast.Attribute):
            parts.append(f.attr)
            f = f.value
        if not isinstance(f, ast.Name):
            return ""
        return ".".join([self.aliases.get(f.id, f.id), *reversed(parts)])

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in ("getattr", "setattr", "delattr") and len(node.args) >= 2:
            attr = _fold(node.args[1])
            base = ast.unparse(node.args[0])
            if attr is None:
                root = self._resolve(node.args[0]).split(".")[0]
                if root in RISKY_BASES or not isinstance(node.args[0], ast.Name | ast.Attribute):
                    self.add(node, "dynamic", f"{name}({base}, <computed name>)")
            else:
                if not isinstance(node.args[1], ast.Constant):
                    self.add(node, "dynamic", f"{name}({base}, {attr!r}) with a name built at run time")
                before = len(self.out)
                self._attr(node, attr, self.aliases.get(base, base))
                if len(self.out) > before:
                    self.out[-1] = Finding(node.lineno, self.out[-1].kind, f"{name}({base}, {attr!r})")
        if name in ("globals", "vars", "locals") and isinstance(f, ast.Name):
            if not node.args:
                self.add(node, "dynamic", f"{name}() (the module namespace as a dict)")
            elif self._resolve(node.args[0]).split(".")[0] in RISKY_BASES:  # vars(obj): like getattr on obj
                self.add(node, "dynamic", f"{ast.unparse(node)[:60]} (a risky module's namespace as a dict)")
        full = self._resolve(f)
        if full.startswith("subprocess.") and full.rsplit(".", 1)[-1] in SUBPROCESS_CALLS:
            argv = _literal_argv(node)
            exe = argv[0].rsplit("/", 1)[-1] if argv else None
            if exe in ALLOWED_EXECUTABLES:
                self.add(node, "info", f"runs {' '.join(argv)[:80]}")
            else:
                self.add(node, "process", f"runs {' '.join(argv)[:80] if argv else 'a command built at run time'}")
        if name in READERS:
            for s in _path_literals(node):
                if (CODE_SUFFIX.search(s) or s in self.siblings) and not any(c in s for c in "*?["):
                    base = s.rsplit("/", 1)[-1]
                    self.add(node, "code_file", f"reads {s} ({ast.unparse(node)[:60]})")
                    if base in self.siblings:
                        self.code_refs.append(base)
        self.generic_visit(node)


READERS = ("open", "read_text", "read_bytes", "FileIO", "fdopen", "exec", "run_path", "compile")


def _path_literals(node: ast.Call) -> list[str]:
    """The file names a reading call's arguments spell out. A nested reading call reports its own (one finding per
    fact: `exec(open(p).read())` is the `open`'s), and in `x.replace(old, new)` only `new` is a name that is read."""
    out: list[str] = []

    def walk(n: ast.AST) -> None:
        if n is not node and isinstance(n, ast.Call):
            f = n.func
            if (f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None) in READERS:
                return
            if isinstance(f, ast.Attribute) and f.attr == "replace" and len(n.args) == 2:
                walk(f.value)
                walk(n.args[1])
                return
        if isinstance(n, ast.Constant | ast.BinOp) and (s := _fold(n)):
            out.append(s)
            return
        for child in ast.iter_child_nodes(n):
            walk(child)

    walk(node)
    return out


def _token_scan(text: str, siblings: set[str]) -> list[Finding]:
    """A grammar-free scan for scripts no available parser accepts: suspicious names and imports by token."""
    out: list[Finding] = []
    words = {**{m: "network" for m in NETWORK_MODULES | NETWORK_ATTRS - {"hub"}},
             **{m: "process" for m in PROCESS_MODULES | PROCESS_ATTRS},
             **{m: "native" for m in NATIVE_MODULES | NATIVE_ATTRS},
             **{m: "dynamic" for m in (DYNAMIC_NAMES | DYNAMIC_MODULES) - {"types", "inspect", "code"}}}
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
        for i, tok in enumerate(toks):
            after_dot = i > 0 and toks[i - 1].string == "."  # `model.eval()`, `torch.compile`: attributes, not names
            with_arg = tok.string == "vars" and toks[i + 1:i + 3] and toks[i + 1].string == "(" and (
                toks[i + 2].string != ")")  # vars(obj) is obj's attributes, not the module namespace
            if tok.type == tokenize.NAME and tok.string in words and not after_dot and not with_arg:
                out.append(Finding(tok.start[0], words[tok.string], f"token `{tok.string}`"))
            elif tok.type == tokenize.STRING:
                for sib in siblings:
                    if sib in tok.string and CODE_SUFFIX.search(sib):
                        out.append(Finding(tok.start[0], "code_file", f"names {sib}"))
    except (tokenize.TokenError, SyntaxError, IndentationError) as e:
        out.append(Finding(0, "dynamic", f"tokenizer stopped ({e}); the rest of the file was not scanned"))
    return out


def scan_script(text: str, siblings: set[str] | frozenset[str] = frozenset(), other_pythons: bool = True) -> Scan:
    """Decode, parse (this Python, else a newer one, else tokens) and list capabilities with line numbers."""
    siblings = set(siblings)
    here = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
    wrapper, inner, error = "plain", text, None
    try:
        ast.parse(text)
        inner, wrapper, error = decode_wrappers(text)
        tree = ast.parse(inner)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: NUL bytes
        msg, lineno = getattr(e, "msg", None) or str(e) or type(e).__name__, getattr(e, "lineno", None)
        why = f"{here} cannot parse {'the decoded source' if wrapper != 'plain' else 'it'} ({msg}, line {lineno})"
        for exe in newer_pythons() if other_pythons else []:  # PEP 701 f-strings need 3.12, in the payload too
            res = _scan_elsewhere(exe, text)
            if res is not None and res["parsed_with"] != "tokens":
                name = exe.rsplit("/", 1)[-1]
                scan = Scan(res["wrapper"], res["inner"], f"ast ({name})", res["parse_error"] or f"{why}; {name} can",
                            [Finding(**f) for f in res["findings"]], res["code_refs"], python=exe)
                _sibling_refs(scan, siblings)
                return scan
        none = "" if not other_pythons or newer_pythons() else "; no newer python3.X on PATH"
        return Scan(wrapper, inner, "tokens", f"{why}{none}", _token_scan(inner, siblings))
    cap = _Capabilities(siblings)
    try:
        cap.visit(tree)
    except RecursionError:
        cap.out.append(Finding(0, "dynamic", "nesting too deep to walk; the rest was not scanned"))
    findings = sorted(set(cap.out), key=lambda f: (f.line, f.kind, f.what))
    if error:
        findings.insert(0, Finding(0, "dynamic", error))
        inner = None
    return Scan(wrapper, inner, f"ast ({here})", None, findings, sorted(set(cap.code_refs)))


def _sibling_refs(scan: Scan, siblings: set[str]) -> None:
    """Names of sibling files a scan done elsewhere (without the folder listing) mentions as code."""
    for f in scan.findings:
        for sib in siblings:
            if sib in f.what and sib not in scan.code_refs:
                scan.code_refs.append(sib)


if __name__ == "__main__":  # `pythonX.Y tools/script_scan.py -`: JSON scan of stdin under that grammar
    res = scan_script(sys.stdin.read(), other_pythons=False)
    print(json.dumps({**asdict(res), "findings": [asdict(f) for f in res.findings]}))
