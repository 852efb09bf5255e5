"""The hostile-program corpus: each program must end in reward 0 with the right reason, within
its time limit, leave no process behind and leave the host unchanged.

Safety on a shared machine: every test that could hurt the host if the sandbox were missing
(fork bomb, memory bomb, sockets) first checks, inside the sandbox, that the isolation and
limits it relies on are in place (probe_isolation: unprivileged uid, RLIMIT_NPROC, RLIMIT_AS,
a PID namespace, a network namespace with only lo), and skips otherwise. Every loop and wait
in the programs is bounded. The outside address is 192.0.2.1 (RFC 5737, never routed).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from steer_megatron.rewards import CodeRewardSettings, SandboxSettings, score_code
from steer_megatron.rewards.sandbox import JUDGE_GRACE_S, probe_isolation

SB = SandboxSettings(timeout_s=1.0, program_budget_s=10.0, memory_mb=256, processes=8, output_mb=1.0)
SETTINGS = CodeRewardSettings(sandbox=SB)
NEVER = {"inputs": [""], "outputs": ["__this output is never printed__"]}
# A run ends within its timeout plus the judge's start and the kill; slack for a loaded CI box.
SLACK_S = 4.0


@pytest.fixture(scope="module")
def isolation():
    rep = probe_isolation(SB)
    if not rep.isolated:
        pytest.skip(f"sandbox isolation unavailable here ({rep.reason}); the hostile corpus needs it")
    return rep


def sandbox_pids() -> list[int]:
    """Host processes running as a sandbox uid (uid_base and above)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for line in (d / "status").read_text().splitlines():
                if line.startswith("Uid:"):
                    if int(line.split()[1]) >= SB.uid_base:
                        out.append(int(d.name))
                    break
        except OSError:
            continue
    return out


def run_hostile(src: str, gt=None) -> tuple[object, float]:
    t0 = time.monotonic()
    res = score_code(f"```python\n{src}\n```", gt or NEVER, settings=SETTINGS)
    wall = time.monotonic() - t0
    assert sandbox_pids() == [], "a sandboxed process outlived its run"
    return res, wall


def test_probe_reports_the_isolation_it_relies_on(isolation):
    f = isolation.facts
    assert f["uid"] >= SB.uid_base and f["euid"] == f["uid"] and f["groups"] == []
    assert f["pid"] == 1 and f["pids"] == [1]
    assert f["interfaces"] == ["lo"]
    assert f["nproc"] == SB.processes and f["as"] == SB.memory_mb << 20
    assert not f["root_writable"] and not f["usr_writable"] and f["work_writable"]
    assert f["env"] == ["HOME", "LANG", "PATH", "TMPDIR"]


def test_a_short_test_timeout_does_not_fail_the_probe(isolation):
    # the probe runs with its own roomy limits: a loaded machine must not read as "no sandbox"
    assert probe_isolation(SandboxSettings(timeout_s=0.01, program_budget_s=0.02)).isolated


def test_fork_bomb(isolation):
    res, wall = run_hostile(
        "import os, time\nt = time.time()\nwhile time.time() - t < 30:\n"
        "    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    assert (res.reward, res.reason) == (0.0, "timeout")
    assert wall < SB.timeout_s + SLACK_S


def test_infinite_loop(isolation):
    res, wall = run_hostile("while True:\n    pass\n")
    assert (res.reward, res.reason) == (0.0, "timeout")
    assert wall < SB.timeout_s + SLACK_S


def test_memory_bomb(isolation):
    res, wall = run_hostile("a = []\nfor _ in range(10**6):\n    a.append(bytearray(10**7))\n")
    assert (res.reward, res.reason) == (0.0, "memory")
    assert wall < SB.timeout_s + SLACK_S


def test_hundred_megabyte_print(isolation):
    res, wall = run_hostile("import sys\nline = 'x' * 999 + '\\n'\nfor _ in range(100_000):\n    sys.stdout.write(line)\n")
    assert (res.reward, res.reason) == (0.0, "output_limit")
    assert wall < SB.timeout_s + SLACK_S


def test_writes_outside_its_directory(isolation, tmp_path):
    tag = uuid.uuid4().hex
    targets = [f"/usr/steer-canary-{tag}", f"/etc/steer-canary-{tag}", f"/steer-canary-{tag}",
               f"/tmp/steer-canary-{tag}", str(Path.cwd() / f"steer-canary-{tag}"), f"/proc/sys/kernel/steer-{tag}"]
    src = (f"targets = {targets!r}\n"
           "for p in targets:\n"
           "    try:\n        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n"
           "open('/work/own-file', 'w').write('mine')  # its own directory is writable\n"
           "raise SystemExit(3)\n")
    res, wall = run_hostile(src)
    assert (res.reward, res.reason) == (0.0, "runtime_error")
    for p in targets:
        assert not os.path.lexists(p), f"the sandbox wrote {p} on the host"


def test_reading_the_trainers_environment_and_files(isolation, monkeypatch):
    secret = f"steer-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("STEER_TEST_SECRET", secret)
    host_file = Path(f"/tmp/steer-hostfile-{uuid.uuid4().hex}.txt")  # its name must not hold the secret
    host_file.write_text(secret)
    host_file.chmod(0o644)  # world-readable on the host: only the sandbox's view keeps it out
    try:
        src = (
            "import glob, os, re\nseen = ' '.join(f'{k}={v}' for k, v in os.environ.items())\n"
            f"paths = ['/proc/1/environ', '/proc/self/environ', {str(host_file)!r}] + glob.glob('/proc/*/environ')"
            " + glob.glob('/tmp/*') + glob.glob('/work/*')\n"
            "for p in paths:\n    try:\n        seen += open(p, 'rb').read(1 << 20).decode(errors='replace')\n"
            "    except OSError:\n        pass\n"
            "m = re.search(r'steer-secret-[0-9a-f]{32}', seen)\nprint(m.group(0) if m else 'nothing')\n"
        )
        # The expected output is the secret: a program that found it would score 1.
        res, _ = run_hostile(src, {"inputs": [""], "outputs": [secret]})
        assert (res.reward, res.reason) == (0.0, "wrong_answer")
    finally:
        host_file.unlink()


@pytest.fixture
def listener():
    """A TCP server on the host's 127.0.0.1 that hands the secret to whoever connects."""
    secret = f"steer-secret-{uuid.uuid4().hex}"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.sendall(secret.encode())
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], secret, accepted
    stop.set()
    t.join(timeout=2)
    srv.close()


def _connect_src(host: str, port: int) -> str:
    # A connect that is not refused at once would run into the 1 s test limit (reason timeout).
    return (f"import socket\ntry:\n    s = socket.create_connection(({host!r}, {port}), timeout=30)\n"
            "    print(s.recv(100).decode())\nexcept OSError as e:\n    print('failed', e.errno)\n")


def test_socket_to_localhost(isolation, listener):
    port, secret, accepted = listener
    res, wall = run_hostile(_connect_src("127.0.0.1", port), {"inputs": [""], "outputs": [secret]})
    assert (res.reward, res.reason) == (0.0, "wrong_answer")  # failed at once: no secret, no timeout
    assert accepted == []


def test_socket_to_an_outside_address(isolation):
    assert isolation.facts["interfaces"] == ["lo"]  # verified inside the sandbox before any attempt
    res, wall = run_hostile(_connect_src("192.0.2.1", 80), {"inputs": [""], "outputs": ["connected"]})
    assert (res.reward, res.reason) == (0.0, "wrong_answer")


def test_killing_its_parent(isolation):
    src = ("import os, signal\nfor pid in (os.getppid(), 0, -1, 1):\n"
           "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
           "raise SystemExit(4)\n")
    res, wall = run_hostile(src)
    # The judge (and everything above it) runs as root outside the PID namespace: out of reach.
    assert (res.reward, res.reason) == (0.0, "runtime_error")
    assert wall < SB.timeout_s + SLACK_S


def test_sleeping_past_the_timeout(isolation):
    res, wall = run_hostile("import time\ntime.sleep(60)\n")
    assert (res.reward, res.reason) == (0.0, "timeout")
    assert wall < SB.timeout_s + SLACK_S


def test_closing_its_output_and_sleeping(isolation):
    res, wall = run_hostile("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)\n")
    assert (res.reward, res.reason) == (0.0, "timeout")
    assert wall < SB.timeout_s + SLACK_S


def test_detached_daemon(isolation):
    src = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        os.close(1); os.close(2)\n        time.sleep(30)\n        os._exit(0)\n    os._exit(0)\n"
        "time.sleep(0.2)\nprint('daemon started')\n"
    )
    res, wall = run_hostile(src)  # run_hostile checks that the daemon died with the run
    assert (res.reward, res.reason) == (0.0, "wrong_answer")
    assert wall < SB.timeout_s + SLACK_S


def test_the_judge_itself_is_bounded(isolation):
    # Many slow tests: the program budget (not the number of tests) bounds the whole call.
    sb = SandboxSettings(timeout_s=2.0, program_budget_s=3.0, memory_mb=256, processes=8, output_mb=1.0)
    gt = {"inputs": [""] * 20, "outputs": ["x"] * 20}
    t0 = time.monotonic()
    res = score_code("```python\nimport time\ntime.sleep(0.5)\nprint('x')\n```", gt,
                     settings=CodeRewardSettings(sandbox=sb, partial_credit=True))
    wall = time.monotonic() - t0
    # each test takes >= 0.5 s, so at most 6 fit in 3 s; the rest are not run and count as timeouts
    assert res.reason == "timeout" and 1 <= res.passed <= 6 and res.reward == pytest.approx(res.passed / 20)
    assert wall < sb.program_budget_s + JUDGE_GRACE_S
