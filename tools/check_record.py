"""Check a record folder from the bytes on disk: size, time, logs vs submission.json, what the script may do, and
(with --against) significance vs a reference record. Prints a verdict table; exit 1 on any FAIL, 2 on unreadable
input.

Usage: `python tools/check_record.py FOLDER [--against REFERENCE_FOLDER] [--alpha 0.01]`

* size: for every seed, packed train_gpt.py bytes + that seed's artifact (final_model_seed<S>.int6.ptz) <=
  16,000,000. Upstream-layout folders carry no artifacts: the logged model bytes are used instead (said so).
* time: train and eval seconds from each log's time ledger (ours) <= 600 each. Upstream logs have no ledger: train =
  the stopping_early time + the Hessian collection when logged (calibration reads training data, so it counts;
  ECOSYSTEM.md §2.4), eval = total_eval_time when logged, else the sliding-window + TTT eval times.
* logs vs submission.json: the same seed set; per-seed val_bpb / val_loss / artifact bytes / steps and the mean agree
  within the rounding of the submitted numbers; bytes_code / bytes_total match the files.
* the script, statically (the wrapper decoded): no exec/eval/compile/__import__/importlib/runpy beyond the wrapper's
  one exec of its literal, no open()/read of a path ending in .py, no subprocess except `["nvidia-smi"]`, imports
  only from the stdlib minus networking/code-loading modules plus torch, numpy, sentencepiece, brotli, zstandard and
  flash_attn_interface; the readable twin (if present) and the logged sources are AST-equivalent to it.
* --against: one-sided Welch t-test of this folder's per-seed bpb vs the reference's with the 0.005-nat margin in
  bpb (tokens/byte from the final lines: bpb·ln2/loss), p vs --alpha, and the seeds needed at the observed spread.
"""

from __future__ import annotations

import argparse
import ast
import base64
import functools
import json
import lzma
import re
import statistics
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.build_record import (
    ARTIFACT_LIMIT_BYTES,
    TIME_LIMIT_S,
    RecordError,
    inline_quant,
    normalized_dump,
)
from tools.parse_log import parse_log, read_log
from tools.stats import RECORD_MARGIN_NATS, nats_to_bpb, seeds_needed, tokens_per_byte, welch_one_sided

ALLOWED_THIRD_PARTY = {"torch", "numpy", "sentencepiece", "brotli", "zstandard", "flash_attn_interface"}
DENIED_STDLIB = {  # network access and ways to load or run other code
    "socket", "ssl", "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib", "xmlrpc",
    "socketserver", "asyncio", "selectors", "webbrowser", "wsgiref", "mailbox", "importlib", "runpy", "imp",
    "zipimport", "pkgutil", "code", "codeop", "builtins", "ctypes", "pty", "multiprocessing", "ensurepip", "venv",
}
ALLOWED_MODULES = (set(sys.stdlib_module_names) - DENIED_STDLIB) | ALLOWED_THIRD_PARTY | {"__future__"}
FORBIDDEN_NAMES = {"exec", "eval", "compile", "__import__", "__builtins__", "breakpoint"}
FORBIDDEN_ATTRS = {  # code loading, shells, downloads
    "__import__", "import_module", "run_path", "run_module", "exec_module", "load_module", "system", "popen",
    "spawnl", "spawnle", "spawnlp", "spawnv", "spawnve", "spawnvp", "execv", "execve", "execvp", "execl", "execlp",
    "urlopen", "hub", "model_zoo", "load_state_dict_from_url", "download_url_to_file", "hf_hub_download",
}
SUBPROCESS_OK_ATTRS = {"SubprocessError", "TimeoutExpired", "CalledProcessError", "PIPE", "DEVNULL", "STDOUT"}
READ_CALLS = {"open", "read_text", "read_bytes", "load_source", "fdopen"}
PY_PATH = re.compile(r"\.py[cw]?$")
SEED_LOG = re.compile(r"train_seed(\d+)\.log")


class InputError(Exception):
    """Unreadable input (missing folder/file, bad JSON): exit status 2."""


@dataclass(frozen=True)
class Row:
    check: str
    seed: str
    value: str
    limit: str
    status: str  # PASS, FAIL or INFO


# -----------------------------------------------------------------------------------------------------------------
# the script
# -----------------------------------------------------------------------------------------------------------------

def _imports(tree: ast.Module) -> dict[str, str]:
    """Alias -> module for the plain `import x as y` statements of a (wrapper) module."""
    return {a.asname or a.name: a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}


def _literal_kw(node: ast.AST, aliases: dict[str, str]) -> Any:
    """A keyword value of the wrapper's decompress call: literals, `L.FORMAT_RAW`-style constants, lists, dicts."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and aliases.get(node.value.id) == "lzma":
        return getattr(lzma, node.attr)
    if isinstance(node, ast.List):
        return [_literal_kw(e, aliases) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal_kw(k, aliases): _literal_kw(v, aliases) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def decode_script(text: str) -> tuple[str, str]:
    """(inner source, wrapper kind). A self-extracting script is imports + one `exec(<codec>.decompress(
    base64.b85decode|b64decode("<literal>"), ...))`; anything else is analysed as it is ("plain")."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise RecordError(f"train_gpt.py does not parse ({e.msg}, line {e.lineno})") from None
    body = [n for n in tree.body if not isinstance(n, ast.Import)]
    if not (len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Call)
            and isinstance(body[0].value.func, ast.Name) and body[0].value.func.id == "exec"):
        return text, "plain"
    aliases = _imports(tree)
    call = body[0].value
    try:
        (dec,) = call.args
        (b85,) = dec.args
        (literal,) = b85.args
        codec, text_codec = aliases[dec.func.value.id], aliases[b85.func.value.id]
        if not (isinstance(literal, ast.Constant) and isinstance(literal.value, str) and dec.func.attr == "decompress"
                and text_codec == "base64" and b85.func.attr in ("b85decode", "b64decode")):
            raise ValueError
        data = getattr(base64, b85.func.attr)(literal.value)
        kwargs = {k.arg: _literal_kw(k.value, aliases) for k in dec.keywords}
        raw = {"lzma": lzma.decompress, "zlib": zlib.decompress}.get(codec)
        if codec == "brotli":
            import brotli
            raw = brotli.decompress
        if raw is None:
            raise ValueError
        return raw(data, **kwargs).decode("utf-8"), f"{codec}+{b85.func.attr[:3]} exec wrapper"
    except (ValueError, TypeError, AttributeError, KeyError, lzma.LZMAError, zlib.error, UnicodeDecodeError):
        raise RecordError("train_gpt.py execs something other than a decodable literal "
                          "(expected `exec(<lzma|brotli|zlib>.decompress(base64.b85decode(\"...\")...))`)") from None
    except Exception as e:  # brotli.error and friends: still a script that does not decode
        raise RecordError(f"train_gpt.py's packed payload does not decode: {e}") from None


def _strings(node: ast.AST) -> list[str]:
    """String constants in a subtree (f-string literal parts included)."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _is_py_path(s: str) -> bool:
    return bool(PY_PATH.search(s)) and not any(c in s for c in "*?[")


@functools.lru_cache(maxsize=16)  # pure; a folder's script is scanned once per check
def scan_source(src: str) -> tuple[str, ...]:
    """Static violations of the record rules in a script's source, each with its line."""
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        return (f"does not parse ({e.msg}, line {e.lineno})",)
    out: list[str] = []
    subprocess_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            for mod in mods:
                if node.__class__ is ast.ImportFrom and node.level:
                    out.append(f"line {node.lineno}: relative import (a second code file)")
                elif mod.split(".")[0] not in ALLOWED_MODULES:
                    out.append(f"line {node.lineno}: imports {mod} (not in the allow-list)")
                if mod == "subprocess" and isinstance(node, ast.Import):
                    subprocess_names |= {a.asname or a.name for a in node.names if a.name == "subprocess"}
                elif mod == "subprocess":
                    out.append(f"line {node.lineno}: `from subprocess import ...` (only subprocess.run([\"nvidia-smi\"]))")
            if isinstance(node, ast.ImportFrom):
                out += [f"line {node.lineno}: imports {a.name} from {node.module}" for a in node.names
                        if a.name in FORBIDDEN_ATTRS | FORBIDDEN_NAMES]
    # names assigned from an expression holding a .py path literal
    py_names = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(map(_is_py_path, _strings(n.value)))
                for t in n.targets if isinstance(t, ast.Name)}
    nvidia_ok: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in subprocess_names
                    and f.attr == "run" and node.args and isinstance(node.args[0], ast.List)
                    and [getattr(e, "value", None) for e in node.args[0].elts] == ["nvidia-smi"]):
                nvidia_ok.add(id(f))
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in READ_CALLS:
                refs = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & py_names
                if any(map(_is_py_path, _strings(node))) or refs:
                    out.append(f"line {node.lineno}: reads a .py file (`{ast.unparse(node)[:80]}`)")
            if name == "getattr" and len(node.args) > 1 and getattr(node.args[1], "value", None) in (
                    FORBIDDEN_NAMES | FORBIDDEN_ATTRS):
                out.append(f"line {node.lineno}: getattr(..., {node.args[1].value!r})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES and isinstance(node.ctx, ast.Load):
            out.append(f"line {node.lineno}: uses {node.id}")
        elif isinstance(node, ast.Attribute):
            if node.attr in FORBIDDEN_ATTRS:
                out.append(f"line {node.lineno}: uses .{node.attr}")
            elif (isinstance(node.value, ast.Name) and node.value.id in subprocess_names
                  and node.attr not in SUBPROCESS_OK_ATTRS and id(node) not in nvidia_ok):
                out.append(f"line {node.lineno}: subprocess.{node.attr} other than run([\"nvidia-smi\"])")
    return tuple(sorted(set(out), key=lambda s: int(re.match(r"line (\d+)", s)[1]) if s.startswith("line") else 0))


# -----------------------------------------------------------------------------------------------------------------
# the folder
# -----------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _inlined_dump(sources: tuple[tuple[str, str], ...]) -> str:
    """Normalized AST of logged sources after inlining quant/ (what the packed script must decode to)."""
    return normalized_dump(inline_quant(dict(sources)), "logged")


def _decimals(x: float) -> int:
    r = repr(float(x))
    if "e" in r:
        return 17
    return len(r.split(".")[1]) if "." in r else 0


def _agrees(reported: Any, actual: float) -> bool:
    """`reported` equals `actual` to the precision it was written with."""
    if not isinstance(reported, int | float) or isinstance(reported, bool):
        return False
    return abs(float(reported) - actual) <= 0.5 * 10.0 ** -_decimals(reported) + 1e-12


def read_logs(folder: Path) -> dict[int, dict[str, Any]]:
    logs: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("train_seed*.log")):
        m = SEED_LOG.fullmatch(path.name)
        if not m:
            continue
        try:
            logs[int(m[1])] = parse_log(read_log(path))
        except OSError as e:
            raise InputError(f"{path}: {e}") from None
    return logs


def read_submission(folder: Path) -> dict[str, Any]:
    path = folder / "submission.json"
    try:
        sub = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e})") from None
    if not isinstance(sub, dict):
        raise InputError(f"{path}: not a JSON object")
    return sub


def _time_rows(seed: str, p: dict[str, Any]) -> list[Row]:
    rows = []
    limit = f"<= {TIME_LIMIT_S:.0f} s"
    if p["time_totals"] is not None:
        for budget in ("train", "eval"):
            total = p["time_totals"].get(budget)
            parts = sum(r["seconds"] for r in p["time_ledger"] if r["budget"] == budget)
            if total is None or abs(parts - total) > 0.01:
                rows.append(Row(f"{budget} time", seed, f"ledger rows sum to {parts:.3f} s but the total says {total}",
                                limit, "FAIL"))
            else:
                rows.append(Row(f"{budget} time", seed, f"{total:.3f} s (time ledger)", limit,
                                "PASS" if total <= TIME_LIMIT_S else "FAIL"))
        return rows
    if p["train_time_ms"] is None:
        rows.append(Row("train time", seed, "no time ledger and no train time in the log", limit, "FAIL"))
    else:
        train = p["train_time_ms"] / 1000
        how = "stopping_early" if p["stop_reason"] == "wallclock_cap" else "train lines"
        if p["gptq_hessians_s"] is not None:
            train += p["gptq_hessians_s"]
            how += f" + GPTQ Hessians {p['gptq_hessians_s']:.1f} s"
        rows.append(Row("train time", seed, f"{train:.3f} s ({how}; no time ledger)", limit,
                        "PASS" if train <= TIME_LIMIT_S else "FAIL"))
    if p["total_eval_time_s"] is not None:
        ev, how = p["total_eval_time_s"], "total_eval_time"
    else:
        stages = {k: v["eval_time_ms"] for k, v in p["evals"].items()
                  if not k.startswith("diagnostic") and ("sliding" in k or "ttt" in k) and v["eval_time_ms"] is not None}
        ev, how = sum(stages.values()) / 1000, " + ".join(stages) or "no sliding/TTT eval"
    rows.append(Row("eval time", seed, f"{ev:.3f} s ({how}; no time ledger)", limit,
                    "PASS" if ev <= TIME_LIMIT_S else "FAIL"))
    return rows


def check_folder(folder: Path, against: Path | None = None, alpha: float = 0.01) -> list[Row]:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    script = folder / "train_gpt.py"
    try:
        text = script.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{script}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{script}: unreadable ({e})") from None
    sub = read_submission(folder)
    logs = read_logs(folder)
    rows: list[Row] = []
    code_bytes = len(text.encode("utf-8"))

    # the script
    try:
        inner, kind = decode_script(text)
        rows.append(Row("script decodes", "", f"{kind}, {code_bytes:,} -> {len(inner.encode()):,} bytes", "", "PASS"))
        violations = list(scan_source(inner))
        if kind != "plain":
            violations += [f"wrapper {v}" for v in scan_source(text) if not v.endswith("uses exec")]
    except RecordError as e:
        inner, violations = None, [str(e)]
    rows += [Row("script rules", "", v, "no exec/.py reads/network/extra imports", "FAIL") for v in violations]
    if not violations:
        rows.append(Row("script rules", "", "no exec, .py reads, network or non-allow-listed imports",
                        "static AST walk", "PASS"))
    try:
        inner_dump = normalized_dump(inner, "train_gpt.py") if inner is not None else None
    except RecordError:  # already a script-rules FAIL
        inner_dump = None
    twin = folder / "train_gpt_readable.py"
    if twin.is_file() and inner is not None:
        try:
            same = inner_dump is not None and normalized_dump(twin.read_text(encoding="utf-8"), twin.name) == inner_dump
        except RecordError:
            same = False
        rows.append(Row("readable twin", "", "AST-equivalent" if same else "differs from the packed script",
                        "equal modulo docstrings/annotations", "PASS" if same else "FAIL"))

    # seeds
    listed = sub.get("seeds")
    if not isinstance(listed, list) or not all(isinstance(s, int) for s in listed):
        rows.append(Row("seeds", "", f"submission.json seeds = {listed!r}", "a list of ints", "FAIL"))
        listed = []
    results = sub.get("seed_results") or {}
    for s in sorted(set(listed) - set(logs)):
        rows.append(Row("seed log", str(s), f"listed in submission.json, no train_seed{s}.log", "present", "FAIL"))
    for s in sorted(set(logs) - set(listed)):
        rows.append(Row("seed log", str(s), f"train_seed{s}.log not listed in submission.json", "listed", "FAIL"))
    if set(map(str, listed)) != set(results):
        rows.append(Row("seed results", "", f"seed_results {sorted(results)} vs seeds {listed}", "same set", "FAIL"))
    if not logs:
        rows.append(Row("seed log", "", "no train_seed<S>.log in the folder", ">= 1", "FAIL"))

    # per seed: size, time, code, agreement
    artifacts = {int(m[1]): p for p in folder.glob("final_model_seed*.int6.ptz")
                 if (m := re.fullmatch(r"final_model_seed(\d+)\.int6\.ptz", p.name))}
    totals: dict[int, int] = {}
    logged_same: dict[tuple, bool] = {}
    limit = f"<= {ARTIFACT_LIMIT_BYTES:,}"
    for seed, p in sorted(logs.items()):
        s = str(seed)
        if p["seed"] is not None and p["seed"] != seed:
            rows.append(Row("seed", s, f"the log says seed {p['seed']}", f"{seed} (file name)", "FAIL"))
        if seed in artifacts:
            model, how = artifacts[seed].stat().st_size, "artifact file"
            if p["bytes_model"] is not None:
                ok = model == p["bytes_model"]
                rows.append(Row("artifact vs log", s, f"file {model:,} vs logged {p['bytes_model']:,}", "equal",
                                "PASS" if ok else "FAIL"))
        elif artifacts:
            rows.append(Row("size", s, f"no final_model_seed{seed}.int6.ptz", "present", "FAIL"))
            continue
        elif p["bytes_model"] is not None:
            model, how = p["bytes_model"], "logged model bytes; the folder has no artifacts"
        else:
            rows.append(Row("size", s, "no artifact file and no model bytes in the log", limit, "FAIL"))
            continue
        totals[seed] = code_bytes + model
        rows.append(Row("size", s, f"{code_bytes:,} + {model:,} = {totals[seed]:,} ({how})", limit,
                        "PASS" if totals[seed] <= ARTIFACT_LIMIT_BYTES else "FAIL"))
        rows += _time_rows(s, p)
        if p["sources"] and inner is not None:
            key = tuple(sorted(p["sources"].items()))
            if key not in logged_same:  # seeds normally share their sources: inline and parse them once
                try:
                    logged_same[key] = p["sources"] == {"train_gpt.py": text} or (
                        inner_dump is not None and _inlined_dump(key) == inner_dump)
                except RecordError:
                    logged_same[key] = False
            same = logged_same[key]
            rows.append(Row("code vs log", s, "the logged sources are this script" if same else
                            "the logged sources differ from this script", "AST-equal", "PASS" if same else "FAIL"))
        elif inner is not None:
            rows.append(Row("code vs log", s, "the log embeds no framed source; not tied to this script", "", "INFO"))
        if sub.get("track") == "10min_16mb":
            gpus = p["gpus"]
            if p["runtime"].get("device") == "cpu":
                rows.append(Row("hardware", s, "ran on CPU", "8xH100 for track 10min_16mb", "FAIL"))
            elif gpus:  # logs with an nvidia-smi header (console captures have none)
                ok = len(gpus) == 8 and all("H100" in g for g in gpus)
                rows.append(Row("hardware", s, f"{len(gpus)}x {', '.join(sorted(set(gpus)))}",
                                "8xH100 for track 10min_16mb", "PASS" if ok else "FAIL"))
        r = results.get(s)
        if not isinstance(r, dict):
            continue
        checks = [("val_bpb", p["final_val_bpb"]), ("val_loss", p["final_val_loss"]), ("steps", p["steps"])]
        for key, actual in checks:
            if key in r and actual is not None:
                ok = _agrees(r[key], actual)
                rows.append(Row(f"json {key}", s, f"{r[key]} vs log {actual}", "agree", "PASS" if ok else "FAIL"))
        if "artifact_bytes" in r:
            ok_model = r["artifact_bytes"] == model
            ok_total = p["bytes_total"] is not None and r["artifact_bytes"] in (p["bytes_total"], totals[seed])
            what = "model bytes" if ok_model else "code + model bytes" if ok_total else "neither model nor total bytes"
            rows.append(Row("json artifact_bytes", s, f"{r['artifact_bytes']:,} = {what}", "agree",
                            "PASS" if ok_model or ok_total else "FAIL"))

    # folder-level agreement
    finals = [p["final_val_bpb"] for _, p in sorted(logs.items()) if p["final_val_bpb"] is not None]
    if finals and "val_bpb" in sub:
        mean = statistics.fmean(finals)
        rows.append(Row("json val_bpb (mean)", "", f"{sub['val_bpb']} vs logs {mean:.8f}", "agree",
                        "PASS" if _agrees(sub["val_bpb"], mean) else "FAIL"))
    if "bytes_code" in sub:
        rows.append(Row("json bytes_code", "", f"{sub['bytes_code']} vs file {code_bytes}", "equal",
                        "PASS" if sub["bytes_code"] == code_bytes else "FAIL"))
    if "bytes_total" in sub and totals:
        rows.append(Row("json bytes_total", "", f"{sub['bytes_total']} vs max {max(totals.values())}", "equal",
                        "PASS" if sub["bytes_total"] == max(totals.values()) else "FAIL"))
    if against is not None:
        rows += significance_rows(logs, against, alpha)
    return rows


def reference_scores(folder: Path) -> list[float]:
    """A reference record's per-seed final bpb: from its logs, else from its submission.json."""
    if not folder.is_dir():
        raise InputError(f"--against {folder}: not a directory")
    logs = read_logs(folder)
    scores = [p["final_val_bpb"] for _, p in sorted(logs.items()) if p["final_val_bpb"] is not None]
    if scores:
        return scores
    results = read_submission(folder).get("seed_results") or {}
    return [float(r["val_bpb"]) for r in results.values() if isinstance(r, dict) and "val_bpb" in r]


def significance_rows(logs: dict[int, dict[str, Any]], against: Path, alpha: float) -> list[Row]:
    ref = reference_scores(against)
    finals = [p for _, p in sorted(logs.items()) if p["final_val_bpb"] is not None and p["final_val_loss"]]
    cand = [p["final_val_bpb"] for p in finals]
    if len(cand) < 2 or len(ref) < 2:
        return [Row("significance", "", f"{len(cand)} candidate vs {len(ref)} reference seeds", ">= 2 each", "FAIL")]
    tpb = statistics.fmean(tokens_per_byte(p["final_val_loss"], p["final_val_bpb"]) for p in finals)
    margin = nats_to_bpb(RECORD_MARGIN_NATS, tpb)
    try:
        w = welch_one_sided(cand, ref, margin)
    except ValueError as e:
        return [Row("significance", "", str(e), f"p < {alpha}", "FAIL")]
    delta = w.mean_reference - w.mean_candidate
    rows = [Row("significance", "", f"Δ = {delta:.5f} bpb (ref {w.mean_reference:.5f} n={w.n_reference}, this "
                f"{w.mean_candidate:.5f} n={w.n_candidate}), margin {margin:.5f} bpb = 0.005 nats at "
                f"{tpb:.4f} tokens/byte; Welch t = {w.t:.3f}, df = {w.df:.1f}, p = {w.p:.4g}", f"p < {alpha}",
                "PASS" if w.p < alpha else "FAIL")]
    plan = seeds_needed(w.std_candidate, w.std_reference, w.n_reference, delta, alpha=alpha, margin=margin)
    rows.append(Row("seeds needed", "", plan.message, "", "INFO"))
    return rows


def format_rows(rows: list[Row]) -> str:
    head = Row("check", "seed", "value", "limit", "verdict")
    widths = [min(max(len(getattr(r, f)) for r in [head, *rows]), cap)
              for f, cap in (("check", 22), ("seed", 6), ("value", 200), ("limit", 40), ("status", 7))]
    lines = []
    for r in [head, *rows]:
        cells = [r.check, r.seed, r.value, r.limit, r.status]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    fails = sum(r.status == "FAIL" for r in rows)
    lines.append(f"{'FAIL' if fails else 'PASS'}: {fails} violation(s) in {len(rows)} checks")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check a record folder: size, time, logs vs submission.json, script "
                                             "rules, and significance vs a reference record.")
    ap.add_argument("folder", type=Path, help="record folder (train_gpt.py, train_seed<S>.log, submission.json, ...)")
    ap.add_argument("--against", type=Path, default=None,
                    help="reference record folder (its logs or submission.json seed_results) for the Welch test")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level of the one-sided test (default 0.01)")
    args = ap.parse_args(argv)
    if not 0 < args.alpha < 1:
        print(f"check_record.py: error: --alpha {args.alpha}: must be in (0, 1)", file=sys.stderr)
        return 2
    try:
        rows = check_folder(args.folder, args.against, args.alpha)
    except InputError as e:
        print(f"check_record.py: error: {e}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
