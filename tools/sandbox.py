"""Run a record's script where it cannot hurt, and watch what it does (docs/rules.md "The sandbox run").

The sandbox is bubblewrap (Debian/Ubuntu package `bubblewrap`): new user, network, PID and IPC namespaces (so no
network at all: connects fail with ENETUNREACH), the whole filesystem read-only, and only the run's temporary
directory writable. Two observers report what the script tried:
* a Python audit hook installed before the script starts (PEP 578): sockets, DNS, processes, native libraries,
  imports and files opened, each as one JSON line on an inherited descriptor;
* strace (package `strace`), when installed, from outside the sandbox: every connect() and execve() of the whole
  process tree, which also sees what C++ code (`TCPStore`) and child processes do.
Without bubblewrap nothing is run: callers report the dynamic check as not run. Hostile code is never executed
outside the sandbox.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The observer that runs inside the sandbox before the record's script (stdlib only, no project imports).
AUDIT_RUNNER = r'''
import json, os, sys
_out = os.fdopen(int(sys.argv[1]), "w", buffering=1)
_root = os.path.realpath(sys.argv[2])
_busy = [False]
_NET = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "urllib.Request"}
_PROC = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
         "os.startfile"}
_KEEP = _NET | _PROC | {"ctypes.dlopen", "import", "open", "marshal.loads", "pickle.find_class"}

def _emit(kind, **kw):
    _busy[0] = True
    try:
        _out.write(json.dumps({"kind": kind, **kw}, default=repr) + "\n")
    except Exception:
        pass
    finally:
        _busy[0] = False

def _hook(event, args):
    if _busy[0] or event not in _KEEP:
        return
    if event == "open":
        path = args[0]
        if isinstance(path, int):
            return
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        _emit("open", path=os.path.realpath(os.fsdecode(path)), mode=mode)
    elif event == "import":
        if args[1]:
            _emit("import", module=args[0], path=os.path.realpath(os.fsdecode(args[1])))
    elif event == "ctypes.dlopen":
        _emit("dlopen", name=None if args[0] is None else os.fsdecode(args[0]))
    elif event == "pickle.find_class":
        _emit("unpickle", target=f"{args[0]}.{args[1]}")
    elif event == "marshal.loads":
        _emit("marshal", size=len(args[0]) if hasattr(args[0], "__len__") else None)
    elif event in _NET:
        _emit("network", event=event, args=[a for a in args if isinstance(a, str | bytes | tuple | int)][:3])
    else:
        _emit("process", event=event, args=[a for a in args if isinstance(a, str | bytes | list | tuple)][:2])

sys.addaudithook(_hook)
_emit("start")
sys.argv = sys.argv[3:]
import atexit, runpy
atexit.register(_emit, "end")
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except BaseException as _e:  # why the script stopped, and where: the frames of the traceback, outermost first
    _frames, _tb = [], _e.__traceback__
    while _tb is not None and len(_frames) < 200:
        _frames.append([_tb.tb_frame.f_code.co_filename, _tb.tb_lineno, _tb.tb_frame.f_code.co_name])
        _tb = _tb.tb_next
    _emit("exit", exc=type(_e).__name__, msg=str(_e)[:300], frames=_frames)
    raise
'''

STRACE_CONNECT = re.compile(r"^(\d+)\s+connect\(\d+, \{sa_family=(AF_INET6?)(.*?)\}")
STRACE_EXEC = re.compile(r'^(\d+)\s+execve\("([^"]*)", \[(.*?)\]')
IP = re.compile(r'inet_(?:addr|pton)\((?:AF_INET6, )?"([^"]+)"\)')
PORT = re.compile(r"htons\((\d+)\)")


@dataclass
class Observation:
    """What a sandboxed run did. `ran` is False (with `reason`) when no sandbox was available."""
    ran: bool
    reason: str = ""
    returncode: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    observers: list[str] = field(default_factory=list)
    network: list[str] = field(default_factory=list)
    processes: list[tuple[str, str]] = field(default_factory=list)  # (executable name, detail) started by the script
    native: list[str] = field(default_factory=list)  # native libraries loaded from outside the Python install
    code_files: list[str] = field(default_factory=list)  # files beside the script it imported or read as code
    files_read: list[str] = field(default_factory=list)  # files beside the script it opened (any)
    unpickled: list[str] = field(default_factory=list)  # classes/functions loaded from pickle data
    outside_reads: list[str] = field(default_factory=list)  # files opened outside the interpreter, data and record
    observer_intact: bool = True
    stdout_tail: str = ""
    stderr_tail: str = ""
    workdir: Path | None = None
    python: str = ""  # the interpreter that ran the script (`python3.13`, when its grammar was needed)
    exit_cause: str | None = None  # the exception the script stopped on (`RuntimeError: CUDA is required (...)`)
    script_ran: bool | None = None  # whether any of the record's own functions ran (None: no exception reported)


@functools.lru_cache(maxsize=1)
def sandbox_status() -> str | None:
    """None when bubblewrap works here, else why not (one line). PGOLF_SANDBOX=off disables it (nothing then runs)."""
    if os.environ.get("PGOLF_SANDBOX") == "off":
        return "disabled by PGOLF_SANDBOX=off"
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    try:
        proc = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
                               "--die-with-parent", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap does not start: {e}"
    if proc.returncode != 0:
        return f"bubblewrap cannot create namespaces here: {proc.stderr.strip()[:160]}"
    return None


PYTHON_ROOTS = ("import json, site, sys, sysconfig; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
                "sysconfig.get_paths()['stdlib'], *site.getsitepackages()]))")


@functools.lru_cache(maxsize=8)
def _python_roots(python: str) -> tuple[str, ...]:
    """Where another interpreter keeps its stdlib and packages (asked of it; parsing its answer runs nothing)."""
    try:
        out = subprocess.run([python, "-c", PYTHON_ROOTS], capture_output=True, text=True, timeout=60).stdout
        return tuple(r for r in json.loads(out) if isinstance(r, str))
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return ()


def _allowed_roots(python: str | None = None) -> list[str]:
    """Where an interpreter legitimately reads and loads libraries from."""
    import site
    import sysconfig
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages(),
             sysconfig.get_paths()["stdlib"], "/usr/lib", "/lib", "/usr/lib64", "/lib64", "/usr/local/lib",
             "/usr/share", "/etc", "/proc", "/sys", "/dev", *(_python_roots(python) if python else ())}
    return sorted({os.path.realpath(r) for r in roots if r})


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def command(work: Path, script_dir: Path, script: str, events_fd: int, strace_out: Path | None,
            read_only: list[str] = (), python: str | None = None) -> list[str]:
    """bwrap argv: everything read-only, /tmp empty (then the interpreter's own dirs and `read_only` dirs bound back,
    read-only), `work` writable; the script runs under `python` (default: this interpreter)."""
    bwrap = shutil.which("bwrap") or "bwrap"
    interpreter = [r for r in _allowed_roots(python) if _under(r, ["/tmp"]) and os.path.isdir(r)]  # a venv in /tmp
    ro = [a for d in [*interpreter, *read_only] for a in ("--ro-bind", d, d)]
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", *ro,
           "--bind", str(work), str(work), "--unshare-all", "--die-with-parent", "--new-session",
           "--chdir", str(script_dir), "--", python or sys.executable, str(work / "_pgolf_audit.py"), str(events_fd),
           str(script_dir), script]
    if strace_out is not None:
        cmd = ["strace", "-f", "-qq", "-e", "trace=connect,execve", "-o", str(strace_out), *cmd]
    return cmd


def _read_events(path: Path, obs: Observation, script_dir: Path, script: str, extra_roots: list[str],
                 python: str | None = None) -> None:
    roots = _allowed_roots(python) + [os.path.realpath(r) for r in extra_roots]
    record = os.path.realpath(script_dir)
    work = os.path.dirname(record)
    main = os.path.join(record, script)
    kinds: list[str] = []
    for line in path.read_text(errors="replace").splitlines()[:200_000]:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            obs.observer_intact = False
            continue
        kind = ev.get("kind")
        kinds.append(kind)
        if kind == "network":
            obs.network.append(f"{ev.get('event')} {ev.get('args')}"[:160])
        elif kind == "process":
            obs.processes.append((_executable(ev.get("event", ""), ev.get("args") or []),
                                  f"{ev.get('event')} {ev.get('args')}"[:160]))
        elif kind == "dlopen" and ev.get("name") and "/" in ev["name"]:
            lib = os.path.realpath(ev["name"])
            if _under(lib, [work]) or not _under(lib, roots):  # the folder, the run's files, anything not installed
                obs.native.append(ev["name"])
        elif kind == "import" and _under(ev.get("path", ""), [record]):
            obs.code_files.append(os.path.relpath(ev["path"], record))
        elif kind == "open":
            p = ev.get("path", "")
            if _under(p, [record]) and p != main:
                obs.files_read.append(os.path.relpath(p, record))
                if re.search(r"\.(py|pyc|so|pyz|zip)$", p):
                    obs.code_files.append(os.path.relpath(p, record))
            elif not _under(p, roots + [record, "/tmp"]) and len(obs.outside_reads) < 50:  # /tmp: the sandbox's own
                obs.outside_reads.append(p)
        elif kind == "exit":
            obs.exit_cause, obs.script_ran = _exit_cause(ev, record)
        elif kind == "unpickle":
            target = ev.get("target", "")
            if target.split(".")[0] in ("os", "posix", "nt", "subprocess", "builtins", "sys", "socket", "importlib",
                                        "runpy", "ctypes", "shutil", "pty", "code", "types", "marshal"):
                obs.unpickled.append(target)
    if not kinds or kinds[0] != "start":
        obs.observer_intact = False
    for attr in ("code_files", "files_read", "native", "outside_reads"):
        setattr(obs, attr, sorted(set(getattr(obs, attr))))


def _exit_cause(ev: dict, record: str) -> tuple[str | None, bool | None]:
    """(cause, ran): the exception the script stopped on with its deepest frame in the record's code, and whether
    any of the record's own functions ran (a frame of its code other than the module body). A SyntaxError, or an
    import at the top of the script that fails, stops it before it ran anything: the run then decides nothing."""
    exc, msg = str(ev.get("exc") or "?"), str(ev.get("msg") or "")
    if exc == "SystemExit" and msg in ("", "0", "None"):
        return None, None
    frames = [f for f in ev.get("frames") or [] if isinstance(f, list) and len(f) == 3]
    def of_record(fn: str) -> bool:  # a file of the folder, or code it exec'd (`<string>`); not `<frozen runpy>`
        if fn.startswith("<"):
            return not fn.startswith("<frozen")
        return _under(os.path.realpath(os.path.join(record, fn)), [record])

    ours = [(str(fn), ln, str(name)) for fn, ln, name in frames if of_record(str(fn))]
    where = f" ({os.path.basename(ours[-1][0])} line {ours[-1][1]}, in {ours[-1][2]})" if ours else ""
    return f"{exc}: {msg}{where}"[:300], any(name != "<module>" for _, _, name in ours)


def _executable(event: str, args: list) -> str:
    """The program an audited process event starts (`sh` for os.system: it runs a shell)."""
    if event == "os.system":
        return "sh"
    if event in ("os.fork", "os.forkpty"):
        return "fork"
    for a in args:
        if isinstance(a, list | tuple) and a:
            a = a[0]
        if isinstance(a, str | bytes) and a:
            return os.fsdecode(a).split()[0].rsplit("/", 1)[-1]
    return "?"


def _read_strace(path: Path, obs: Observation) -> None:
    execs = 0
    for line in path.read_text(errors="replace").splitlines():
        if m := STRACE_CONNECT.match(line):
            ip, port = IP.search(m[3]), PORT.search(m[3])
            where = f"{ip[1] if ip else '?'}:{port[1] if port else '?'}"
            obs.network.append(f"connect() to {where} ({m[2]}, seen by strace)")
        elif (m := STRACE_EXEC.match(line)) and "= -1" not in line:
            execs += 1
            if execs > 2:  # bwrap itself, then the interpreter; everything after is the script's doing
                obs.processes.append((m[2].rsplit("/", 1)[-1], f"execve {m[2]} [{m[3][:100]}] (seen by strace)"))


def run_sandboxed(record_files: dict[str, bytes], env: dict[str, str], timeout: float, script: str = "train_gpt.py",
                  extra_roots: list[str] | None = None, work: Path | None = None, keep: bool = False,
                  python: str | None = None) -> Observation:
    """Copy `record_files` into a fresh directory, run `python <script>` there inside the sandbox with `env`, and
    return what the observers saw. `extra_roots`: directories the run may read without it being reported (the
    smoke dataset). With `keep`, the directory stays (`workdir`) for the caller to read outputs from. `python`:
    another interpreter (a script written for a newer grammar), else this one."""
    why = sandbox_status()
    if why is not None:
        return Observation(ran=False, reason=why)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="pgolf_sandbox_")) if work is None else work
    try:
        script_dir = work / "record"
        script_dir.mkdir(parents=True, exist_ok=True)
        for name, data in record_files.items():
            if "/" in name or name.startswith("."):
                continue
            (script_dir / name).write_bytes(data)
        (work / "_pgolf_audit.py").write_text(AUDIT_RUNNER)
        events = work / "events.jsonl"
        fd = os.open(events, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        strace_out = work / "strace.txt" if shutil.which("strace") else None
        here = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
        obs = Observation(ran=True, observers=["audit hook"] + (["strace"] if strace_out else []),
                          workdir=work if keep else None, python=os.path.basename(python) if python else here)
        t0 = time.perf_counter()
        try:
            cmd = command(work, script_dir, script, fd, strace_out, [os.path.realpath(r) for r in extra_roots or []],
                          python)
            proc = subprocess.run(cmd, env=env, pass_fds=(fd,),
                                  capture_output=True, text=True, errors="replace", timeout=timeout,
                                  stdin=subprocess.DEVNULL)
            obs.returncode, obs.stdout_tail, obs.stderr_tail = proc.returncode, proc.stdout[-4000:], proc.stderr[-4000:]
        except subprocess.TimeoutExpired as e:
            obs.timed_out = True
            obs.stdout_tail = (e.stdout or b"")[-4000:].decode("utf-8", "replace") if isinstance(e.stdout, bytes) else ""
        finally:
            os.close(fd)
        obs.seconds = time.perf_counter() - t0
        _read_events(events, obs, script_dir, script, extra_roots or [], python)
        if strace_out is not None and strace_out.is_file():
            _read_strace(strace_out, obs)
        return obs
    finally:
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """A minimal environment for a sandboxed run (no tokens, no proxies, nothing of the caller's but PATH/locale)."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
    env.update(HOME="/tmp", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env
