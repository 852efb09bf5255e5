"""The judge: runs one program against its tests, each run in a fresh sandbox, and prints verdicts.

Started by steer_megatron.rewards.sandbox as `python -I -S _judge.py PARENT_PID` in its own
session, one per calling thread, and kept: it reads jobs (one program and its tests) on stdin
and writes results on stdout. It imports nothing from the package (it runs outside any
isolation, as the calling user, and must stay small and auditable).

Per test (isolated mode), the judge forks a helper that enters new mount, PID, network, IPC and
UTS namespaces and forks the program's process, PID 1 of the new PID namespace. That process
builds a root on a private tmpfs (read-only binds of the interpreter and system libraries, a
fresh /proc, four /dev nodes, a writable size-capped /work), chroots into it, sets resource
limits, drops to an unprivileged uid with no groups and no capabilities, and execs the
interpreter with an empty-but-minimal environment. When that process ends, or the judge kills
the helper (wall-clock limit, output cap), the kernel kills everything left in the namespace:
nothing survives a run. Expected outputs stay in the judge; the program never sees them.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

_libc = ctypes.CDLL(None, use_errno=True)

# The interpreter runs with -I -S (no environment, no site-packages: fast start); `exit`/`quit`
# come from site, so the bootstrap restores them before running the program as __main__.
BOOT = (
    "import sys,builtins\n"
    "builtins.exit=builtins.quit=sys.exit\n"
    "sys.argv=['main.py']\n"
    "src=open('main.py',encoding='utf-8').read()\n"
    "g={'__name__':'__main__','__file__':'main.py','__builtins__':builtins}\n"
    "exec(compile(src,'main.py','exec'),g)\n"
)
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/work", "LANG": "C.UTF-8"}


class SetupError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(src, dst, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


def _write_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _bind_ro(root: str, src: str, device: bool = False) -> None:
    """Make `src` visible read-only at the same path under `root` (symlinks are copied as links).
    `device`: a device node, left usable and writable (no nodev, no read-only)."""
    dst = root + src
    parent = os.path.dirname(dst)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if os.path.islink(src):
        if not os.path.lexists(dst):
            os.symlink(os.readlink(src), dst)
        return
    if os.path.lexists(dst):  # already under an earlier bind (e.g. /usr/local below /usr)
        return
    if os.path.isdir(src):
        os.mkdir(dst, 0o755)
    else:
        _write_file(dst, b"", 0o444)
    _mount(src, dst, None, MS_BIND | MS_REC)
    # device nodes stay writable (writing /dev/null is harmless and programs expect it)
    flags = MS_NOSUID if device else MS_RDONLY | MS_NOSUID | MS_NODEV
    _mount(None, dst, None, MS_BIND | MS_REMOUNT | flags)


def _limits(lim: dict) -> None:
    cpu = max(1, math.ceil(lim["cpu_s"]))
    mem = int(lim["memory_mb"]) << 20
    fsize = int(lim["file_size_mb"]) << 20
    for res, val in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL at the hard
        (resource.RLIMIT_AS, (mem, mem)),
        (resource.RLIMIT_NPROC, (lim["processes"], lim["processes"])),
        (resource.RLIMIT_NOFILE, (lim["open_files"], lim["open_files"])),
        (resource.RLIMIT_FSIZE, (fsize, fsize)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(res, val)


def _drop_privileges(uid: int) -> None:
    if os.geteuid() != 0:
        return  # unisolated fallback as an ordinary user: already unprivileged
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # from root to a non-zero uid: every capability is dropped
    if os.getuid() != uid or os.geteuid() != uid:
        raise SetupError("could not drop to the sandbox uid")


def _build_root(job: dict, stdin: bytes, uid: int) -> str:
    """In the new mount namespace: a private tmpfs root with read-only system binds; returns it."""
    _mount("steer-sbx", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,mode=755")
    root = "/tmp/root"
    os.mkdir(root, 0o755)
    for src in job["binds"]:
        if os.path.lexists(src):
            _bind_ro(root, src)
    for dev in ("null", "zero", "random", "urandom"):
        _bind_ro(root, "/dev/" + dev, device=True)
    os.mkdir(root + "/proc", 0o555)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    work = root + "/work"
    os.mkdir(work, 0o700)
    size = int(job["limits"]["file_size_mb"]) * 4 + 4  # a few files of the per-file cap
    _mount("steer-sbx-work", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode=700")
    os.symlink("work", root + "/tmp")
    _write_file(work + "/main.py", job["source"].encode(), 0o644)
    _write_file(root + "/stdin", stdin, 0o444)
    os.chown(work, uid, uid)
    os.chown(work + "/main.py", uid, uid)
    return root


def _exec_program(job: dict, stdin: bytes, uid: int, isolated: bool, fds: dict) -> None:
    """In the program's process: finish the sandbox and exec; never returns."""
    try:
        if isolated:
            _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl")
            root = _build_root(job, stdin, uid)
            stdin_fd = os.open(root + "/stdin", os.O_RDONLY)
            os.chroot(root)
            os.chdir("/work")
        else:
            work = fds["workdir"]
            _write_file(work + "/main.py", job["source"].encode(), 0o644)
            _write_file(work + "/.stdin", stdin, 0o444)
            stdin_fd = os.open(work + "/.stdin", os.O_RDONLY)
            if os.geteuid() == 0:
                os.chown(work, uid, uid)
            os.chdir(work)
            os.setsid()  # its own process group, killed as a whole by the judge
        os.dup2(stdin_fd, 0)
        os.dup2(fds["out"], 1)
        os.dup2(fds["err"], 2)
        info = fds["info"]
        os.closerange(3, info)  # the judge's pipes must not reach the program
        os.closerange(info + 1, 1 << 16)
        _limits(job["limits"])
        _drop_privileges(uid)
        if isolated:  # a change of uid clears the parent-death signal: set it again
            _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl")
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
        os.set_inheritable(info, False)
        os.execve(job["python"], [job["python"], "-I", "-S", "-c", BOOT], ENV)
    except BaseException as exc:  # noqa: BLE001 - reported to the judge through the info pipe
        hint = ""
        if isinstance(exc, PermissionError) and not isolated:
            hint = " (the sandbox uid cannot reach the interpreter: set reward.code.python to one outside root-only directories)"
        try:
            os.write(fds["info"], f"setup: {type(exc).__name__}: {exc}{hint}"[:400].encode())
        finally:
            os._exit(121)


def _spawn_isolated(job: dict, stdin: bytes, uid: int, fds: dict) -> int:
    """Fork the namespace helper; it forks the program (PID 1 of the new PID namespace)."""
    judge = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl")
        if os.getppid() != judge:
            os._exit(1)
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        # Before anything is mounted: nothing done in this namespace may propagate to the host.
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        # The judge stops a run by sending this helper SIGUSR1; the helper kills the program's
        # process (PID 1: the kernel then kills the whole namespace) and still reaps it, so no
        # orphan is left to the host's init. Only the helper signals that pid, and only while
        # it is unreaped (a zombie at worst), so a recycled pid is never hit.
        box: dict = {}
        signal.signal(signal.SIGUSR1, lambda *_: os.kill(box["child"], signal.SIGKILL) if box else os._exit(9))
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            _exec_program(job, stdin, uid, True, fds)
        box["child"] = child
        for fd in (fds["out"], fds["err"]):
            os.close(fd)
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        _, status, usage = os.wait4(child, 0)
        os.write(fds["info"], f"\nstatus {status} {usage.ru_utime + usage.ru_stime:.3f}".encode())
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(fds["info"], f"setup: {type(exc).__name__}: {exc}"[:400].encode())
        finally:
            os._exit(121)


def _kill(pid: int, isolated: bool) -> None:
    """Stop a run. `pid` is the judge's own unreaped child (the helper, or the program when
    unisolated), so it cannot have been recycled. Isolated: ask the helper to kill PID 1 of the
    namespace. Unisolated: kill the program's process group."""
    try:
        if isolated:
            os.kill(pid, signal.SIGUSR1)
        else:
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_one(job: dict, stdin: bytes, uid: int, isolated: bool, timeout_s: float) -> dict:
    """Run the program once; returns exit status, captured output and why it was stopped."""
    lim = job["limits"]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    info_r, info_w = os.pipe()
    workdir = None
    if not isolated:
        import tempfile

        workdir = tempfile.mkdtemp(prefix="steer-sbx-")
    fds = {"out": out_w, "err": err_w, "info": info_w, "workdir": workdir}
    t0 = time.monotonic()
    if isolated:
        pid = _spawn_isolated(job, stdin, uid, fds)
    else:
        pid = os.fork()
        if pid == 0:
            _exec_program(job, stdin, uid, False, fds)
    for fd in (out_w, err_w, info_w):
        os.close(fd)
    chunks = {out_r: [], err_r: [], info_r: []}
    sizes = {out_r: 0, err_r: 0, info_r: 0}
    caps = {out_r: int(lim["output_mb"] * (1 << 20)), err_r: int(lim["output_mb"] * (1 << 20)), info_r: 4096}
    open_fds = [out_r, err_r, info_r]
    stopped = None
    deadline = t0 + timeout_s
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            stopped = stopped or "timeout"
            _kill(pid, isolated)
            deadline = math.inf  # now wait for the pipes to close (every holder is dead)
            left = 5.0
        ready, _, _ = select.select(open_fds, [], [], min(left, 5.0))
        if not ready and deadline == math.inf:
            os.kill(pid, signal.SIGKILL)  # the helper did not finish the run: it and PID 1 die now
            break
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if not data:
                open_fds.remove(fd)
                continue
            sizes[fd] += len(data)
            if sizes[fd] > caps[fd]:
                if fd != info_r and stopped is None:
                    stopped = "output_limit"
                    _kill(pid, isolated)
                    deadline = math.inf
                continue
            chunks[fd].append(data)
    for fd in (out_r, err_r, info_r):
        os.close(fd)
    # Isolated, the helper closed its info pipe: it is exiting. Unisolated, the program may have
    # closed its pipes and still run: wait for it until the deadline. Either way `pid` is only
    # signalled while unreaped (WNOWAIT), so its number cannot have been recycled.
    hard = math.inf
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        now = time.monotonic()
        if now >= deadline:
            stopped = stopped or "timeout"
            _kill(pid, isolated)
            deadline, hard = math.inf, now + 5.0
        elif now >= hard:
            os.kill(pid, signal.SIGKILL)
            hard = math.inf
        time.sleep(0.002)
    if not isolated:
        _kill(pid, False)  # whatever is left in the program's process group
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    info = b"".join(chunks[info_r]).decode(errors="replace")
    if workdir is not None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    prog_status, cpu, setup = None, None, None
    for line in info.splitlines():
        if line.startswith("status "):
            prog_status, cpu = int(line.split()[1]), float(line.split()[2])
        elif line.startswith("setup: "):
            setup = line[len("setup: "):]
    if not isolated:
        prog_status, cpu = status, usage.ru_utime + usage.ru_stime
    return {
        "stdout": b"".join(chunks[out_r]), "stderr": b"".join(chunks[err_r]), "status": prog_status,
        "stopped": stopped, "setup_error": setup, "wall_s": wall, "cpu_s": cpu,
    }


# -- verdicts --------------------------------------------------------------------------------------
def _tokens_equal(a: str, b: str, tol: float) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isfinite(x) and math.isfinite(y) and abs(x - y) <= tol * max(1.0, abs(y))


def stdout_matches(got: str, want: str, tol: float) -> bool:
    """Line by line, whitespace-insensitive within and at the ends of lines and of the output
    (blank lines count only where both have the same number of lines); numeric tokens may
    differ by `tol` (relative above 1, absolute below)."""
    g = [ln.split() for ln in got.strip().splitlines()]
    w = [ln.split() for ln in want.strip().splitlines()]
    if len(g) != len(w):  # then blank lines do not count
        g, w = [ln for ln in g if ln], [ln for ln in w if ln]
    if len(g) != len(w):
        return False
    return all(len(a) == len(b) and all(_tokens_equal(x, y, tol) for x, y in zip(a, b)) for a, b in zip(g, w))


def _values_equal(a, b, tol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol * max(1.0, abs(b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_values_equal(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k], tol) for k in a)
    return a == b


def verdict(run: dict, test: dict, mode: str, tol: float, cpu_limit: float) -> str:
    if run["setup_error"]:
        return "sandbox_error"
    if run["stopped"]:
        return run["stopped"]
    status = run["status"]
    err = run["stderr"][-4096:].decode(errors="replace")
    if status is None:
        return "sandbox_error"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one
        cpu_out = sig == signal.SIGXCPU or (sig == signal.SIGKILL and (run["cpu_s"] or 0) >= math.ceil(cpu_limit))
        return "timeout" if cpu_out else "runtime_error"
    code = os.WEXITSTATUS(status)
    if code != 0:
        if "MemoryError" in err:
            return "memory"
        if "File too large" in err:
            return "output_limit"
        if mode == "script" and "AssertionError" in err:  # a failed test assert, not a crash
            return "wrong_answer"
        return "runtime_error"
    if mode == "script":
        return "pass"
    out = run["stdout"].decode(errors="replace")
    if mode == "call":
        try:
            got = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        except ValueError:
            return "wrong_answer"
        want = test["output"]
        ok = _values_equal(got, want, tol) or (isinstance(want, list) and len(want) == 1 and _values_equal(got, want[0], tol))
        return "pass" if ok else "wrong_answer"
    return "pass" if stdout_matches(out, test["output"], tol) else "wrong_answer"


def judge(job: dict) -> dict:
    isolated = job["isolate"]
    # One uid per judge: concurrent runs never share a uid, so none can signal another or eat
    # into another's process limit. Host pids are unique among live processes.
    uid = int(job["uid_base"]) + os.getpid()
    lim = job["limits"]
    t_start = time.monotonic()
    results = []
    for i, test in enumerate(job["tests"]):
        left = job["budget_s"] - (time.monotonic() - t_start)
        if left <= 0:
            results.append({"verdict": "timeout", "detail": "program budget spent", "wall_s": 0.0})
            if job["stop_on_fail"]:
                break
            continue
        run = run_one(job, test.get("input", "").encode(), uid, isolated, min(lim["timeout_s"], left))
        v = verdict(run, test, job["mode"], job["float_tol"], lim["cpu_s"])
        res = {"verdict": v, "wall_s": round(run["wall_s"], 4)}
        if v == "sandbox_error":
            res["detail"] = run["setup_error"] or "no status from the sandbox"
        elif v != "pass":
            res["detail"] = run["stderr"][-300:].decode(errors="replace")
        if job.get("keep_stdout_bytes"):
            res["stdout"] = run["stdout"][: job["keep_stdout_bytes"]].decode(errors="replace")
        results.append(res)
        if v != "pass" and job["stop_on_fail"]:
            break
    return {"results": results, "isolated": isolated, "uid": uid}


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def main() -> None:
    """Serve jobs until stdin closes: each an 8-byte big-endian length and JSON, answered the same way."""
    # The judge dies with the process that started it (a reward worker killed on its time limit),
    # and its sandboxes die with it.
    _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl")
    if os.getppid() != int(sys.argv[1]):
        sys.exit("the judge's parent exited before it started")
    while True:
        head = _read_exact(0, 8)
        body = None if head is None else _read_exact(0, int.from_bytes(head, "big"))
        if body is None:
            return
        try:
            out = judge(json.loads(body))
        except Exception as exc:  # noqa: BLE001 - a bad job must not take the judge down
            out = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        data = json.dumps(out).encode()
        view = memoryview(len(data).to_bytes(8, "big") + data)
        while view:
            view = view[os.write(1, view):]


if __name__ == "__main__":
    main()
