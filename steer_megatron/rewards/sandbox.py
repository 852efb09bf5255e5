"""Run untrusted programs against tests: isolation checks, limits, and the judge process.

`run_tests(...)` hands one program and all its tests to the judge (`_judge.py`, a separate
interpreter in its own session, started once per calling thread and kept), and waits at most
the program's budget plus a grace period; if the judge overruns, its whole session is killed,
and with it every sandbox it started (each is tied to the judge by a parent-death signal); the
next call starts a new judge. How a single run is isolated is described in
_judge.py and in the README section "Code rewards and the sandbox".

Isolation (namespaces, chroot, an unprivileged uid) needs root or CAP_SYS_ADMIN. Without it the
programs would run with resource limits only, which does not contain a hostile program; that
fallback is refused unless `allow_unisolated` is set.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

JUDGE = str(Path(__file__).with_name("_judge.py"))
# Seconds the judge may run past the program budget (its own start-up, the last kill) before
# it is killed from outside.
JUDGE_GRACE_S = 10.0
# uids handed to sandboxed programs are uid_base + the judge's pid: one fresh uid per judge that
# owns no file on the host. Linux pids stay below 2**22, uids below 2**32 - 1.
_MAX_PID = 1 << 22


class SandboxUnavailable(RuntimeError):
    """Isolation is not available here and the unisolated fallback was not allowed."""


@dataclass(frozen=True)
class SandboxSettings:
    timeout_s: float = 5.0  # wall clock per test run; the CPU-time limit is the same number
    program_budget_s: float = 60.0  # wall clock for all the tests of one program
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    processes: int = 16  # processes and threads of the sandbox uid (RLIMIT_NPROC)
    open_files: int = 64  # RLIMIT_NOFILE
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE); /work holds 4 such
    output_mb: float = 8.0  # stdout (and, separately, stderr) beyond this stops the run
    float_tol: float = 1e-6  # numeric tokens in outputs may differ by this (relative above 1)
    allow_unisolated: bool = False  # run with rlimits only where namespaces are unavailable (unsafe)
    uid_base: int = 1_000_000_000
    python: str | None = None  # interpreter for the programs; None = this Python's base interpreter
    extra_binds: tuple[str, ...] = ()  # more host paths to show read-only (e.g. a site-packages)

    def __post_init__(self) -> None:
        for name in ("timeout_s", "program_budget_s", "output_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox {name} must be > 0, got {getattr(self, name)}")
        for name in ("memory_mb", "processes", "open_files", "file_size_mb"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"sandbox {name} must be >= 1, got {getattr(self, name)}")
        if self.memory_mb < 64:
            raise ValueError(f"sandbox memory_mb={self.memory_mb} is below what the interpreter needs to start (64)")
        if self.open_files < 16:
            raise ValueError(f"sandbox open_files={self.open_files}: the interpreter needs at least 16")
        if not 1000 <= self.uid_base <= (1 << 32) - 2 - _MAX_PID:
            raise ValueError(f"sandbox uid_base={self.uid_base}: must be in [1000, {(1 << 32) - 2 - _MAX_PID}]")
        for p in self.extra_binds:
            if not os.path.isabs(p):
                raise ValueError(f"sandbox extra_binds: {p!r} is not an absolute path")

    def interpreter(self) -> str:
        return self.python or os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)

    def binds(self) -> list[str]:
        """Host paths the sandbox sees read-only: system libraries, the interpreter's prefix."""
        exe = self.interpreter()
        prefix = sys.base_prefix if self.python is None else str(Path(exe).resolve().parent.parent)
        out = ["/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/etc/ld.so.cache"]
        if not any(prefix == b or prefix.startswith(b + "/") for b in out):
            out.append(prefix)
        if not any(exe == b or exe.startswith(b + "/") for b in out):
            out.append(exe)
        if any(p == "/tmp" or p.startswith("/tmp/") for p in out + list(self.extra_binds)):
            raise ValueError(f"sandbox: the interpreter or a bind lies under /tmp ({out}); the sandbox "
                             f"builds its root on a tmpfs there, so install the interpreter elsewhere")
        return out + list(self.extra_binds)

    def limits(self) -> dict:
        return {"cpu_s": self.timeout_s, "timeout_s": self.timeout_s, "memory_mb": self.memory_mb,
                "processes": self.processes, "open_files": self.open_files,
                "file_size_mb": self.file_size_mb, "output_mb": self.output_mb}


@dataclass
class JudgeReport:
    verdicts: list[str]  # one per test run (fewer than the tests when stopped at a failure)
    details: list[str] = field(default_factory=list)
    stdouts: list[str] = field(default_factory=list)  # only with keep_stdout_bytes
    isolated: bool = False
    uid: int | None = None
    wall_s: float = 0.0


def run_tests(source: str, tests: list[dict], mode: str, settings: SandboxSettings, *, isolate: bool,
              stop_on_fail: bool = True, keep_stdout_bytes: int = 0) -> JudgeReport:
    """Run `source` once per test (mode "stdio": stdin -> stdout, "call": JSON args -> JSON result,
    "script": passes when it exits 0) and return one verdict per test run."""
    job = {
        "python": settings.interpreter(), "binds": settings.binds(), "isolate": bool(isolate),
        "uid_base": settings.uid_base, "limits": settings.limits(), "mode": mode, "source": source,
        "tests": tests, "stop_on_fail": stop_on_fail, "budget_s": settings.program_budget_s,
        "float_tol": settings.float_tol, "keep_stdout_bytes": keep_stdout_bytes,
    }
    t0 = time.monotonic()
    deadline = t0 + settings.program_budget_s + JUDGE_GRACE_S
    for attempt in (0, 1):  # a judge found dead before the job reached it is replaced once
        judge = _judge_for(settings.interpreter())
        try:
            judge.send(job)
        except OSError:
            _drop_judge(judge)
            if attempt == 0:
                continue
            raise
        break
    try:
        res = judge.receive(deadline)
    except BaseException:
        _drop_judge(judge)
        raise
    wall = time.monotonic() - t0
    if res is None:  # it overran the program budget, or died
        _drop_judge(judge)
        overran = time.monotonic() >= deadline
        return JudgeReport(["timeout" if overran else "sandbox_error"],
                           ["the judge overran the program budget" if overran else "the judge died"], wall_s=wall)
    if "error" in res:
        return JudgeReport(["sandbox_error"], [res["error"]], wall_s=wall)
    r = res["results"]
    return JudgeReport([x["verdict"] for x in r], [x.get("detail", "") for x in r], [x.get("stdout", "") for x in r],
                       isolated=res["isolated"], uid=res["uid"], wall_s=wall)


class _Judge:
    """A judge process serving one calling thread (its parent-death signal follows that thread)."""

    def __init__(self, python: str):
        self.owner = (os.getpid(), threading.get_ident())
        # Empty environment: the judge needs none, and nothing of the trainer's should reach a program.
        self.proc = subprocess.Popen([python, "-I", "-S", JUDGE, str(os.getpid())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={}, close_fds=True, cwd="/")

    def send(self, job: dict) -> None:
        data = json.dumps(job).encode()
        self.proc.stdin.write(len(data).to_bytes(8, "big") + data)
        self.proc.stdin.flush()

    def receive(self, deadline: float) -> dict | None:
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        need = 8
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, max(need - len(buf), 1 << 16))
            if not chunk:
                return None
            buf += chunk
            if need == 8 and len(buf) >= 8:
                need = 8 + int.from_bytes(buf[:8], "big")
        return json.loads(bytes(buf[8:need]))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session: the judge and every sandbox helper
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


_judges = threading.local()


def _judge_for(python: str) -> _Judge:
    cache = getattr(_judges, "by_python", None)
    if cache is None:
        cache = _judges.by_python = {}
    j = cache.get(python)
    if j is None or j.owner != (os.getpid(), threading.get_ident()) or j.proc.poll() is not None:
        j = cache[python] = _Judge(python)
    return j


def _drop_judge(judge: _Judge) -> None:
    judge.kill()
    cache = getattr(_judges, "by_python", {})
    for k, v in list(cache.items()):
        if v is judge:
            del cache[k]


# -- the isolation check -----------------------------------------------------------------------------
_PROBE = r"""
import json, os, resource
def writable(p):
    try:
        with open(p, 'w') as f:
            f.write('x')
        os.remove(p)
        return True
    except OSError:
        return False
nets = [ln.split(':')[0].strip() for ln in open('/proc/net/dev').read().splitlines()[2:] if ':' in ln]
print(json.dumps({
    'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid(), 'groups': os.getgroups(), 'pid': os.getpid(),
    'interfaces': nets, 'nproc': resource.getrlimit(resource.RLIMIT_NPROC)[1],
    'as': resource.getrlimit(resource.RLIMIT_AS)[1], 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
    'root_writable': writable('/steer-probe'), 'usr_writable': writable('/usr/steer-probe'),
    'work_writable': writable('/work/steer-probe'), 'env': sorted(os.environ),
}))
"""


@dataclass(frozen=True)
class IsolationReport:
    isolated: bool
    reason: str  # why not, or "ok"
    facts: dict

    def summary(self) -> str:
        return "isolated" if self.isolated else f"not isolated: {self.reason}"


def check_facts(facts: dict, settings: SandboxSettings) -> str | None:
    """What is missing from a sandbox that reported `facts` (the probe's output), or None."""
    if facts.get("uid") in (None, 0) or facts.get("euid") == 0 or facts.get("uid") < settings.uid_base:
        return f"programs run as uid {facts.get('uid')}, not an unprivileged sandbox uid"
    if facts.get("groups"):
        return f"programs keep supplementary groups {facts['groups']}"
    if facts.get("pid") != 1 or facts.get("pids") != [1]:
        return f"no private PID namespace (pid {facts.get('pid')}, sees {len(facts.get('pids', []))} processes)"
    if set(facts.get("interfaces", ["?"])) - {"lo"}:
        return f"the network namespace has interfaces besides lo: {facts['interfaces']}"
    if facts.get("nproc") != settings.processes or facts.get("as") != settings.memory_mb << 20:
        return f"limits not in place (RLIMIT_NPROC {facts.get('nproc')}, RLIMIT_AS {facts.get('as')})"
    if facts.get("root_writable") or facts.get("usr_writable") or not facts.get("work_writable"):
        return "the file system is not read-only outside /work"
    return None


_probe_cache: dict[SandboxSettings, IsolationReport] = {}


def probe_isolation(settings: SandboxSettings) -> IsolationReport:
    """Run a probe program in the isolated sandbox and check what it sees (cached per settings)."""
    if settings in _probe_cache:
        return _probe_cache[settings]
    if not sys.platform.startswith("linux"):
        rep = IsolationReport(False, f"namespaces need Linux, this is {sys.platform}", {})
    else:
        # The probe checks isolation, not speed: a loaded machine must not make a short test
        # timeout read as "no sandbox here".
        roomy = replace(settings, timeout_s=max(settings.timeout_s, 10.0),
                        program_budget_s=max(settings.program_budget_s, 20.0))
        try:
            r = run_tests(_PROBE, [{"input": ""}], "script", roomy, isolate=True, keep_stdout_bytes=1 << 16)
        except OSError as exc:
            rep = IsolationReport(False, f"could not start the judge: {exc}", {})
        else:
            if r.verdicts != ["pass"]:
                rep = IsolationReport(False, f"{r.verdicts[0]}: {r.details[0].strip()[-300:]}", {})
            else:
                facts = json.loads(r.stdouts[0])
                problem = check_facts(facts, settings)
                rep = IsolationReport(problem is None, problem or "ok", facts)
    _probe_cache[settings] = rep
    return rep


def resolve_isolation(settings: SandboxSettings) -> bool:
    """True when programs will run isolated; False for the allowed fallback; else raises."""
    rep = probe_isolation(settings)
    if rep.isolated:
        return True
    if settings.allow_unisolated:
        return False
    raise SandboxUnavailable(
        f"the code sandbox is unavailable here ({rep.reason}). It needs Linux and root (or CAP_SYS_ADMIN) "
        f"for namespaces. Run the trainer as root / in a container with that capability, or set "
        f"reward.code.allow_unisolated=true to run programs with resource limits only (not safe for "
        f"untrusted code; see README 'Code rewards and the sandbox')"
    )


def settings_dict(settings: SandboxSettings) -> dict:
    return asdict(settings)
