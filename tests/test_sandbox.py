"""The Python sandbox against hostile code, for real: bwrap namespaces, cgroups and rlimits on this machine.

Each test runs model-style code through run_python with small limits (1-3 s) and checks what a user of
the server would notice: the code cannot reach the network or the server's files, bombs and floods end
quickly, nothing it started outlives the call, and the server process is unharmed.
"""
from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from backend.tools.sandbox import CGROUP_PREFIX, CallCgroups, PythonTool, SandboxLimits, SandboxUnavailable, run_python

LIMITS = SandboxLimits(wall_s=3, cpu_s=1, memory_mb=128, max_procs=16, max_output_bytes=10_000, tmp_mb=8)

pytestmark = pytest.mark.usefixtures("sandbox_required")  # fails (not skips) without isolation: tests/conftest.py


def cgroup_guards() -> list[str]:
    cg = CallCgroups(LIMITS)
    cg.kill_all_and_remove()
    return cg.guard


# Root ignores RLIMIT_NPROC: only a writable pids cgroup stops a fork bomb (the guard list says which).
HAVE_PIDS_CGROUP = any(g.startswith("pids-cgroup") for g in cgroup_guards())
HAVE_MEMORY_CGROUP = any(g.startswith("memory-cgroup") for g in cgroup_guards())


def run(code: str, limits: SandboxLimits = LIMITS):
    return run_python(textwrap.dedent(code), limits)


def sandbox_cgroups() -> list[str]:
    found = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(root, d) for d in dirs if d.startswith(CGROUP_PREFIX)]
        dirs[:] = [d for d in dirs if not d.startswith(CGROUP_PREFIX) and root.count("/") < 8]
    return found


def test_plain_code_runs_and_reports_its_guards():
    r = run("import sys; print(sum(range(101))); print('warn', file=sys.stderr); raise SystemExit(3)")
    assert r.stdout == "5050\n" and r.stderr == "warn\n" and r.exit_code == 3
    assert not r.timed_out and r.killed_reason is None and not r.truncated
    assert "net-ns: no network" in r.guard and "pid-ns" in r.guard
    assert HAVE_PIDS_CGROUP == any(g.startswith("pids-cgroup") for g in r.guard), r.guard
    assert HAVE_PIDS_CGROUP or "pids: none (RLIMIT_NPROC does not bind root)" in r.guard
    assert r.as_text() == "5050\nwarn\n[exit code 3]"


def test_working_directory_is_empty_and_writable_but_bounded():
    r = run("""
        import os
        print(os.getcwd(), os.listdir('.'))
        open('a.txt', 'w').write('hi'); print(open('a.txt').read())
        try:
            open('big', 'wb').write(b'x' * (20 << 20))
        except OSError as e:
            print('big file refused', e.errno)
    """)
    lines = r.stdout.splitlines()
    assert lines[0] == "/tmp []" and lines[1] == "hi"
    assert lines[2].startswith("big file refused") or r.killed_reason == "file size limit", r


def test_network_is_unreachable_even_the_servers_loopback():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        port = srv.getsockname()[1]
        r = run(f"""
            import socket
            for addr in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)]:
                try:
                    socket.create_connection(addr, timeout=1)
                    print('CONNECTED', addr)
                except OSError as e:
                    print('refused', addr, type(e).__name__)
            try:
                socket.getaddrinfo('example.com', 80)
                print('RESOLVED')
            except OSError as e:
                print('no dns', type(e).__name__)
        """)
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing arrived at the host's listening socket
    assert "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout
    assert r.stdout.count("refused") == 3 and "no dns" in r.stdout


def test_files_outside_the_sandbox_are_invisible(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "playground.db").write_text("password hashes and API keys")
    project = Path(__file__).resolve().parent.parent
    r = run(f"""
        import os
        for p in [{str(data / 'playground.db')!r}, {str(project / 'app.py')!r}, '/root/.bash_history',
                  '/etc/passwd', '/etc/shadow', '/home', '/sys/fs/cgroup']:
            try:
                print('READ', p, len(open(p, 'rb').read()) if not os.path.isdir(p) else os.listdir(p))
            except OSError as e:
                print('denied', p, type(e).__name__)
        print('root', sorted(os.listdir('/root')))
        for d in ['/usr', '/', '/dev', '/root', '/sandbox']:   # only /tmp and /dev/shm (size-limited) are writable
            try:
                open(d.rstrip('/') + '/evil', 'w')
                print('WROTE', d)
            except OSError:
                print('read-only', d)
    """)
    assert "READ" not in r.stdout and "WROTE" not in r.stdout, r.stdout
    assert r.stdout.count("denied") == 7
    assert "root ['.pyenv']" in r.stdout or "root []" in r.stdout  # only the bound interpreter, if under /root
    assert r.stdout.count("read-only") == 5


def test_environment_has_no_secrets(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://admin:hunter2@db/prod")
    monkeypatch.setenv("PLAYGROUND_HOME", "/secret/data")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    # its own environment, and that of every process it can see in /proc (the server's is not there)
    r = run("""
        import os, json
        print(json.dumps(dict(os.environ)))
        for pid in filter(str.isdigit, os.listdir('/proc')):
            print(pid, open(f'/proc/{pid}/environ', 'rb').read())
    """)
    assert "hunter2" not in r.stdout and "sk-secret" not in r.stdout and "PLAYGROUND" not in r.stdout
    assert "DATABASE_URL" not in r.stdout and "/secret" not in r.stdout


@pytest.mark.skipif(not HAVE_PIDS_CGROUP, reason="no writable pids cgroup: the process count is not limited here")
def test_fork_bomb_is_stopped_by_the_pids_limit():
    t0 = time.monotonic()
    r = run("""
        import os, time
        n = 0
        for _ in range(1000):
            try:
                pid = os.fork()
            except OSError as e:
                print('fork refused after', n, 'children:', e.strerror, flush=True)
                break
            if pid == 0:
                while True:          # every child tries to fork too
                    try:
                        os.fork()
                    except OSError:
                        time.sleep(0.05)
            n += 1
    """)
    assert "fork refused after" in r.stdout, r
    assert int(r.stdout.split("after ")[1].split()[0]) < LIMITS.max_procs
    assert time.monotonic() - t0 < LIMITS.wall_s + 3
    assert sandbox_cgroups() == []  # every process killed, the per-call cgroups removed


def test_memory_bomb_is_stopped():
    r = run("""
        chunks = []
        while True:
            chunks.append(bytearray(16 << 20))
    """)
    assert r.exit_code != 0 and not r.timed_out
    assert "MemoryError" in r.stderr or r.killed_reason == "memory limit (cgroup)", r
    assert r.duration_s < LIMITS.wall_s


def test_memory_bomb_in_many_processes_is_stopped():
    r = run("""
        import os
        for _ in range(8):
            if os.fork() == 0:
                break
        chunks = []
        while True:
            chunks.append(bytearray(8 << 20))
    """)
    assert not r.timed_out and r.duration_s < LIMITS.wall_s, r
    # nine processes x 128 MB of address space each would pass the tree's total: the memory cgroup ends it
    if HAVE_MEMORY_CGROUP:
        assert r.killed_reason == "memory limit (cgroup)" or "MemoryError" in r.stderr, r


def test_endless_loop_is_stopped_by_the_cpu_limit():
    r = run("while True: pass")
    assert r.killed_reason == "cpu time limit (1 s)" or r.timed_out, r
    assert r.exit_code != 0 and r.duration_s < LIMITS.wall_s + 1


def test_sleeping_forever_is_stopped_by_the_wall_clock():
    limits = SandboxLimits(**{**LIMITS.__dict__, "wall_s": 1.5})
    r = run("import time; print('start', flush=True); time.sleep(60)", limits)
    assert r.timed_out and r.killed_reason == "wall-clock limit (1.5 s)"
    assert r.stdout == "start\n"  # output before the kill is kept
    assert 1.4 < r.duration_s < 3.5


def test_output_flood_is_capped():
    r = run("while True: print('x' * 999)")
    assert r.truncated and r.killed_reason == "output limit (10000 bytes)"
    assert len(r.stdout) == LIMITS.max_output_bytes and r.duration_s < LIMITS.wall_s
    assert r.as_text().endswith("[output truncated]\n[stopped: output limit (10000 bytes)]")


def test_killing_its_parent_does_not_harm_the_caller():
    r = run("""
        import os, signal
        for pid in (os.getppid(), 1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as e:
                print('kill', pid, type(e).__name__)
        print('still here')
    """)
    assert "still here" in r.stdout
    assert os.getpid() > 0 and run("print('next call works')").stdout == "next call works\n"


def test_a_daemon_left_behind_is_dead_after_the_call():
    marker = f"4242.{os.getpid()}{int(time.time())}"
    t0 = time.monotonic()
    r = run(f"""
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.closerange(0, 3)          # a real daemon: detached from the pipes too
                os.execv('/bin/sleep', ['sleep', '{marker}'])
            os._exit(0)
        os.wait()
        print('parent done')
    """)
    assert r.stdout == "parent done\n" and not r.timed_out
    assert time.monotonic() - t0 < LIMITS.wall_s
    alive = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd:
                alive.append(pid)
    assert alive == []


def test_a_daemon_holding_the_output_pipe_does_not_hold_the_call():
    r = run("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)               # keeps stdout open
            os._exit(0)
        print('parent done')
    """)
    assert r.stdout == "parent done\n" and not r.timed_out and r.duration_s < LIMITS.wall_s


def test_bad_input_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="code is 30 characters; the limit is 10"):
        run_python("x" * 30, SandboxLimits(max_code_chars=10))
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", SandboxLimits(memory_mb=0))
    with pytest.raises(ValueError, match="code is empty"):
        PythonTool(LIMITS).run("  \n")


def test_without_isolation_it_refuses_unless_allowed(monkeypatch):
    from backend.tools import sandbox
    monkeypatch.setattr(sandbox, "isolation", lambda: {"bwrap": False, "userns": False, "why": "bwrap is not installed"})
    with pytest.raises(SandboxUnavailable, match="bwrap is not installed"):
        run_python("print(1)", LIMITS)
    r = run_python("import os; print(os.getcwd().startswith('/tmp'), sorted(os.environ))",
                   SandboxLimits(**{**LIMITS.__dict__, "allow_unisolated": True}))
    assert r.stdout.startswith("True") and "DATABASE_URL" not in r.stdout
    assert "UNISOLATED: network and files reachable" in r.guard


def test_bench_chat_sandbox_part_runs_at_toy_size(capsys):
    import json
    from backend.bench import chat
    chat.main(["--parts", "sandbox", "--calls", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = last["results"][0]
    assert last["bench"] == "chat" and row["unit"] == "ms" and row["ours"] > 0 and row["peer"] > 0
    assert row["overhead_ms"] == pytest.approx(row["ours"] - row["peer"], abs=0.02) and "pid-ns" in row["guard"]


def test_a_flood_of_calls_is_refused_beyond_the_queue():
    from concurrent.futures import ThreadPoolExecutor
    from backend.tools.sandbox import SandboxBusy
    tool = PythonTool(SandboxLimits(**{**LIMITS.__dict__, "wall_s": 5}), max_concurrent=1, max_queue=1)
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(tool.run, "import time; time.sleep(1); print('slow')") for _ in range(2)]
        deadline = time.monotonic() + 10
        while tool.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # poll until one runs and one waits
        assert tool.in_flight == 2
        with pytest.raises(SandboxBusy, match="1 running, 1 waiting"):
            tool.run("print('third')")
        assert [f.result().stdout for f in slow] == ["slow\n", "slow\n"]
    assert tool.in_flight == 0 and tool.run("print('again')").stdout == "again\n"
