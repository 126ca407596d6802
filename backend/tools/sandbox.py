"""Run model-written Python in a sandbox: `run_python(code, limits) -> SandboxResult`.

This is a security boundary: the chat's Python tool and `POST /api/tools/python` run code nobody reviewed
on the server. Every call starts a fresh process tree and tears it down completely when it returns.

How (strongest first; `SandboxResult.guard` lists what was active for that call):
- bubblewrap (`bwrap`) with new user, PID, network, mount, IPC and UTS namespaces. Inside, the code runs
  as uid 65534 with no capabilities (bounding set dropped, no_new_privs), no further user namespaces.
- Mount namespace: an empty root with read-only binds of /usr (and the /bin, /lib... symlinks) and the
  Python installation (under /root/.pyenv here, which is otherwise mode 0700); a fresh /proc showing only
  the sandbox's processes, a minimal /dev, and a size-limited tmpfs at /tmp as the empty working
  directory (it and a /dev/shm of the same size are the only writable places; the rest is read-only). The data directory (database with password hashes and API keys, checkpoints), the project
  tree, /root, /etc and /home do not exist in there. The code arrives as a read-only /sandbox/main.py.
- Network namespace: only its own loopback; nothing outside (not even the server on 127.0.0.1) is reachable.
- PID namespace: when the code's main process exits, the kernel kills every process left in the namespace,
  double-forked daemons included; os.kill(os.getppid(), 9) hits the namespace's init, which ignores it.
- cgroups (created per call under the server's own cgroup, removed after): `pids.max` caps the number of
  processes (RLIMIT_NPROC does not bind root, and the user namespace maps the code to root outside), and
  the memory controller caps the tree's total memory, tmpfs included. Both are used when writable, and
  every process still in them is SIGKILLed when the call ends.
- rlimits set by the launcher before bwrap starts: RLIMIT_AS (memory per process; a bomb gets MemoryError),
  RLIMIT_CPU (SIGXCPU at the limit, SIGKILL a second later), RLIMIT_FSIZE, RLIMIT_NOFILE, no core files.
- The server enforces the wall-clock limit and the output cap (pipes read incrementally; the tree is killed
  at the cap), then kills the whole process group and everything in the cgroups.
- Environment: cleared; only PATH, HOME=/tmp, LANG and PYTHONIOENCODING are set. `python -I -S`: no site
  packages, no PYTHON* variables, the standard library only.

What it does NOT guarantee:
- No seccomp filter: the code can make any system call the kernel allows an unprivileged user in a
  namespace; a kernel bug reachable from there is out of scope.
- Whatever is readable under /usr and the Python installation is readable (no secrets live there here).
- CPU is limited in time, not share: a call may use every core until its limits end it; the server runs
  calls off the event loop and at most `PythonTool.max_concurrent` at once.
- Without writable cgroups the process count is NOT limited (root ignores RLIMIT_NPROC): the guard list
  then says `pids: none`, and only the time limits end a fork bomb.
- Without bubblewrap (or when it cannot create namespaces) there is no network or filesystem isolation:
  `run_python` then refuses with SandboxUnavailable, unless `SandboxLimits.allow_unisolated` is set, in
  which case the code runs with rlimits, a temp dir, a stripped env and a kill of its process group only,
  and the guard list says `UNISOLATED: network and files reachable`. The 503 names the command that
  installs it (`apt-get install bubblewrap`; `make install` runs it). A failed probe is retried after
  REPROBE_FAILED_S, so installing bubblewrap needs no restart.
"""
from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

SANDBOX_UID = 65534  # "nobody" inside the user namespace
CODE_PATH = "/sandbox/main.py"
WORKDIR = "/tmp"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "playground-sandbox-"
# The only variables the code sees: no secrets, no DATABASE_URL, no PLAYGROUND_*.
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
# Launcher: join the per-call cgroups, set rlimits, then exec bwrap (or python). Values come as arguments,
# never spliced into the script. Soft CPU limit first: the hard one cannot go below the soft one.
LAUNCHER = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; n=$((n-1)); done; '
            'ulimit -S -t "$1" && ulimit -H -t "$2" && ulimit -v "$3" && ulimit -f "$4" && ulimit -n "$5" && ulimit -c 0 '
            '|| exit 126; shift 5; exec "$@"')
LAUNCH_FAILED = {125: "could not enter the sandbox cgroup", 126: "could not set the sandbox rlimits"}


class SandboxUnavailable(RuntimeError):
    """No isolation of network and files is possible here and unisolated runs are not allowed."""


@dataclass
class SandboxLimits:
    wall_s: float = 10.0          # wall-clock limit
    cpu_s: int = 5                # CPU seconds per process (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 256          # RLIMIT_AS per process; the memory cgroup caps the tree at memory_mb + tmp_mb
    max_procs: int = 32           # pids.max of the call's cgroup (threads count too)
    max_output_bytes: int = 64_000  # per stream (stdout, stderr); the tree is killed when either passes it
    tmp_mb: int = 16              # size of the tmpfs working directory
    max_code_chars: int = 20_000
    allow_unisolated: bool = False  # run without bwrap (no network/file isolation) instead of refusing

    def check(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_procs", "max_output_bytes", "tmp_mb", "max_code_chars"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, not {getattr(self, name)!r}")
        if self.memory_mb < 32:
            raise ValueError("SandboxLimits.memory_mb must be at least 32 (the interpreter needs about 20 MB)")
        if self.max_procs < 4:
            raise ValueError("SandboxLimits.max_procs must be at least 4 (bwrap and the interpreter count)")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None        # the code's exit status; 128+N when a signal N ended it
    timed_out: bool              # the wall-clock limit ended it
    killed_reason: str | None    # why the server or the kernel ended it early, if it did
    duration_s: float
    truncated: bool              # output passed max_output_bytes and was cut
    guard: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.killed_reason

    def to_dict(self) -> dict:
        return asdict(self)

    def as_text(self) -> str:
        """What a model sees as the tool's output."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.stderr.strip():
            parts.append(self.stderr.rstrip("\n"))
        if self.truncated:
            parts.append("[output truncated]")
        if self.killed_reason:
            parts.append(f"[stopped: {self.killed_reason}]")
        elif self.exit_code:
            parts.append(f"[exit code {self.exit_code}]")
        return "\n".join(parts) if parts else "[no output]"


# ---- what the machine allows ------------------------------------------------------------------

def python_prefix() -> tuple[Path, Path]:
    """(installation prefix, interpreter) of the base Python (not the venv: the sandbox gets no packages)."""
    prefix = Path(sys.base_prefix).resolve()
    exe = prefix / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not exe.exists():
        exe = Path(os.path.realpath(sys.executable))
    return prefix, exe


def _root_binds() -> list[str]:
    """Read-only /usr, and /bin, /lib, /lib64, /sbin as the symlinks or directories they are on the host."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "lib32", "sbin"):
        p = Path("/") / name
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            args += ["--ro-bind", str(p), str(p)]
    return args


def bwrap_args(limits: SandboxLimits, userns: bool, code_fd: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    prefix, exe = python_prefix()
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    if userns:
        args += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    for k, v in SANDBOX_ENV.items():
        args += ["--setenv", k, v]
    args += _root_binds()
    if not str(prefix).startswith("/usr/"):
        args += ["--ro-bind", str(prefix), str(prefix)]
    # Writable: only the size-limited tmpfs at /tmp and /dev/shm; the root tmpfs and /dev are remounted
    # read-only, so nothing else can fill memory with files.
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
             "--size", str(limits.tmp_mb << 20), "--tmpfs", "/dev/shm",
             "--size", str(limits.tmp_mb << 20), "--tmpfs", WORKDIR,
             "--ro-bind-data", str(code_fd), CODE_PATH, "--remount-ro", "/",
             "--chdir", WORKDIR, str(exe), "-I", "-S", CODE_PATH]
    return args


# The probe's answer is kept: a success for REPROBE_OK_S, a failure only for REPROBE_FAILED_S, so installing
# bubblewrap (or fixing namespaces) on a running server takes effect without a restart.
REPROBE_OK_S, REPROBE_FAILED_S = 600.0, 30.0
_probed: tuple[float, dict] | None = None
_probe_lock = threading.Lock()


def isolation() -> dict:
    """Can bwrap make namespaces here, with a user namespace or (as root) without one? (probed, then kept a while)"""
    global _probed
    with _probe_lock:
        now = time.monotonic()
        if _probed is None or now - _probed[0] > (REPROBE_OK_S if _probed[1]["bwrap"] else REPROBE_FAILED_S):
            _probed = (now, _probe())
        return _probed[1]


def _probe() -> dict:
    if not shutil.which("bwrap"):
        return {"bwrap": False, "userns": False,
                "why": "bwrap is not installed (install it: apt-get install bubblewrap, or run make install)"}
    why = ""
    for userns in (True, False):
        with tempfile.TemporaryFile() as f:
            f.write(b"pass\n")
            f.flush()
            f.seek(0)
            cmd = bwrap_args(SandboxLimits(), userns, f.fileno())
            try:
                p = subprocess.run(cmd, pass_fds=(f.fileno(),), capture_output=True, timeout=20, env=SANDBOX_ENV)
            except (OSError, subprocess.TimeoutExpired) as e:
                why = str(e)
                continue
        if p.returncode == 0:
            return {"bwrap": True, "userns": userns, "why": ""}
        why = p.stderr.decode(errors="replace").strip()
    return {"bwrap": False, "userns": False, "why": f"bwrap cannot create namespaces here: {why}"}


# ---- cgroups -------------------------------------------------------------------------------------

def _own_cgroup(controller: str) -> tuple[Path, str] | None:
    """(mount point, our path) of a v1 controller, or of the v2 hierarchy when controller is ''."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if controller and controller in ctrls.split(","):
            return CGROUP_ROOT / controller, path
        if not controller and ctrls == "":
            return CGROUP_ROOT, path
    return None


class CallCgroups:
    """Per-call cgroups under the server's own: pids (process count) and memory (the tree's total)."""

    def __init__(self, limits: SandboxLimits):
        self.dirs: list[Path] = []
        self.guard: list[str] = []
        self.memory_dir: Path | None = None
        name = CGROUP_PREFIX + uuid.uuid4().hex[:12]
        mem_bytes = (limits.memory_mb + limits.tmp_mb) << 20
        v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
        for controller, limit_files in (("pids", [("pids.max", limits.max_procs)]),
                                        ("memory", [("memory.max", mem_bytes), ("memory.swap.max", 0)] if v2 else
                                         [("memory.limit_in_bytes", mem_bytes), ("memory.memsw.limit_in_bytes", mem_bytes)])):
            where = _own_cgroup("" if v2 else controller)
            if where is None:
                continue
            d = where[0] / where[1].lstrip("/") / name
            try:
                d.mkdir()
            except OSError:
                continue
            try:
                (d / limit_files[0][0]).write_text(str(limit_files[0][1]))
                for fname, value in limit_files[1:]:  # swap accounting may be off: best effort
                    try:
                        (d / fname).write_text(str(value))
                    except OSError:
                        pass
            except OSError:
                _rmdir(d)
                continue
            self.dirs.append(d)
            if controller == "memory":
                self.memory_dir = d
            self.guard.append(f"{controller}-cgroup{'-v2' if v2 else ''}")
            if v2:
                break  # one v2 directory carries both controllers (if pids.max was writable, so is memory.max)

    def hit_memory_limit(self) -> bool:
        """Did the kernel's OOM killer act in the call's memory cgroup (v1 memory.oom_control, v2 memory.events)?"""
        if self.memory_dir is None:
            return False
        for fname in ("memory.oom_control", "memory.events"):
            try:
                for line in (self.memory_dir / fname).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
            except (OSError, ValueError):
                continue
        return False

    def kill_all_and_remove(self, deadline_s: float = 5.0) -> None:
        end = time.monotonic() + deadline_s
        for d in self.dirs:
            while time.monotonic() < end:
                try:
                    if (d / "cgroup.kill").exists():
                        (d / "cgroup.kill").write_text("1")
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.01)
            _rmdir(d, end)


def _rmdir(d: Path, until: float | None = None) -> None:
    until = until or time.monotonic() + 1
    while True:  # EBUSY until the last zombie in it is reaped
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > until:
                return
            time.sleep(0.01)


# ---- running ---------------------------------------------------------------------------------------

def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` with `python -I -S` in a fresh sandbox; blocks until it ends (call it off the event loop).

    Raises ValueError for bad input (not a string, too long, NUL bytes) and SandboxUnavailable when the
    machine cannot isolate the code and `limits.allow_unisolated` is False.
    """
    limits = limits or SandboxLimits()
    limits.check()
    if not isinstance(code, str):
        raise ValueError("code must be a string")
    if len(code) > limits.max_code_chars:
        raise ValueError(f"code is {len(code)} characters; the limit is {limits.max_code_chars}")
    if "\x00" in code:
        raise ValueError("code contains a NUL character")
    iso = isolation()
    if not iso["bwrap"] and not limits.allow_unisolated:
        raise SandboxUnavailable(f"no sandbox for Python here ({iso['why']}); the Python tool is disabled "
                                 "(SandboxLimits.allow_unisolated=True runs it without network/file isolation)")
    guard = (["bwrap", "mount-ns: data dir, /root, /etc, project hidden", "net-ns: no network", "pid-ns",
              *(["user-ns: uid 65534, no capabilities"] if iso["userns"] else ["no capabilities (no user-ns)"])]
             if iso["bwrap"] else ["UNISOLATED: network and files reachable"])
    cgroups = CallCgroups(limits)
    guard += cgroups.guard
    if not any(g.startswith("pids-cgroup") for g in cgroups.guard):
        guard.append("pids: none (RLIMIT_NPROC does not bind root)")
    guard += ["rlimit-as", "rlimit-cpu", "rlimit-fsize", "wall-clock", "output-cap", "env-stripped", "tmp-workdir"]

    with tempfile.TemporaryDirectory(prefix="sandbox-") as host_tmp, tempfile.TemporaryFile() as code_file:
        code_file.write(code.encode("utf-8", errors="surrogatepass"))
        code_file.flush()
        code_file.seek(0)
        if iso["bwrap"]:
            cmd, cwd, pass_fds = bwrap_args(limits, iso["userns"], code_file.fileno()), "/", (code_file.fileno(),)
        else:
            main = Path(host_tmp) / "main.py"
            main.write_bytes(code_file.read())
            work = Path(host_tmp) / "work"
            work.mkdir()
            cmd, cwd, pass_fds = [str(python_prefix()[1]), "-I", "-S", str(main)], str(work), ()
        mem_kb = limits.memory_mb << 10
        fsize_blocks = (limits.tmp_mb << 20) // 512  # dash counts RLIMIT_FSIZE in 512-byte blocks
        argv = ["/bin/sh", "-c", LAUNCHER, "sh", str(len(cgroups.dirs)), *map(str, cgroups.dirs),
                str(limits.cpu_s), str(limits.cpu_s + 1), str(mem_kb), str(fsize_blocks), "256", *cmd]
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, env=SANDBOX_ENV, pass_fds=pass_fds, start_new_session=True)
        except OSError:
            cgroups.kill_all_and_remove()
            raise
        try:
            out, err, timed_out, capped = _collect(proc, limits, t0)
        finally:
            _kill_tree(proc)
            proc.wait()
            hit_memory_limit = cgroups.hit_memory_limit()  # read before the cgroup goes
            cgroups.kill_all_and_remove()
        duration = time.monotonic() - t0
    rc = proc.returncode
    exit_code = 128 - rc if rc is not None and rc < 0 else rc  # killed outright (our SIGKILL): report like a shell
    killed_reason = None
    if timed_out:
        killed_reason = f"wall-clock limit ({limits.wall_s:g} s)"
    elif capped:
        killed_reason = f"output limit ({limits.max_output_bytes} bytes)"
    elif exit_code in LAUNCH_FAILED:
        killed_reason = LAUNCH_FAILED[exit_code]
    elif exit_code and hit_memory_limit:  # the OOM killer may pick any process of the tree, bwrap's init too
        killed_reason = "memory limit (cgroup)"
    elif exit_code == 128 + signal.SIGXCPU:
        killed_reason = f"cpu time limit ({limits.cpu_s} s)"
    elif exit_code == 128 + signal.SIGKILL:
        killed_reason = "killed (SIGKILL)"
    elif exit_code == 128 + signal.SIGXFSZ:
        killed_reason = "file size limit"
    return SandboxResult(stdout=out.decode("utf-8", errors="replace"), stderr=err.decode("utf-8", errors="replace"),
                         exit_code=exit_code, timed_out=timed_out, killed_reason=killed_reason,
                         duration_s=round(duration, 4), truncated=capped, guard=guard)


def _collect(proc: subprocess.Popen, limits: SandboxLimits, t0: float) -> tuple[bytes, bytes, bool, bool]:
    """Read both pipes as data comes, until the process exits, the wall clock runs out or output passes the cap."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline = t0 + limits.wall_s
    timed_out = capped = False
    exited = False
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            ready = sel.select(timeout=min(0.05, deadline - now))
            for key, _ in ready:
                while True:  # drain what is there now
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        break
                    if not chunk:
                        sel.unregister(key.fd)
                        break
                    buf = bufs[key.fd]
                    room = limits.max_output_bytes - len(buf)
                    buf += chunk[:max(room, 0)]
                    if len(chunk) > room:
                        capped = True
                        break
                if capped:
                    break
            if capped:
                break
            if exited:
                break  # one last drain done after exit; daemons holding the pipes must not keep us here
            exited = proc.poll() is not None
    finally:
        sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), timed_out, capped


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (bwrap, and with it the PID namespace)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---- the service the Playground holds -----------------------------------------------------------------

class SandboxBusy(RuntimeError):
    """Every sandbox slot stayed taken for the wait limit."""


class PythonTool:
    """The Python tool as a service: default limits, at most `max_concurrent` runs at once (2 CPU cores) and
    at most `max_queue` callers waiting for a slot; more fail at once with SandboxBusy, so a flood of calls
    cannot tie up the server's worker threads."""

    def __init__(self, limits: SandboxLimits | None = None, max_concurrent: int = 2, max_queue: int = 4):
        self.limits = limits or SandboxLimits()
        self.limits.check()
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self.in_flight = 0  # running + waiting

    def run(self, code: str) -> SandboxResult:
        if not isinstance(code, str) or not code.strip():
            raise ValueError("code is empty")
        if len(code) > self.limits.max_code_chars:
            raise ValueError(f"code is {len(code)} characters; the limit is {self.limits.max_code_chars}")
        with self._lock:
            if self.in_flight >= self.max_concurrent + self.max_queue:
                raise SandboxBusy(f"the sandbox is busy ({self.max_concurrent} running, {self.max_queue} waiting); try again")
            self.in_flight += 1
        try:
            if not self._slots.acquire(timeout=self.limits.wall_s):
                raise SandboxBusy(f"all {self.max_concurrent} sandbox slots stayed busy for {self.limits.wall_s:g} s; try again")
            try:
                return run_python(code, self.limits)
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self.in_flight -= 1

    def describe(self) -> dict:
        iso = isolation()
        return {"isolated": iso["bwrap"], "user_namespace": iso["userns"], "why": iso["why"],
                "limits": asdict(self.limits), "max_concurrent": self.max_concurrent, "max_queue": self.max_queue}
