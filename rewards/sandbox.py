"""Run untrusted programs (model-written code) in a throw-away Linux sandbox.

`run(argv, files=..., stdin=...)` starts `_sandbox_child.py`, which builds the sandbox and
execs the program; this module feeds stdin, collects capped output, enforces the wall-clock
limit and removes every trace afterwards. What one run gets:

- new pid, network, IPC, UTS and mount namespaces: no network at all (only a down loopback),
  no view of host processes, and when the program exits everything it started dies with it;
- a fresh root on a tmpfs: the system and Python directories bound read-only, a private
  /proc, a tiny /dev, and tmpfs /tmp and /work (the throw-away working directory, holding
  `files`), so nothing outside can be written and the host's other files are not visible;
- an unprivileged uid: `nobody` on the host when we are root (host files are then protected
  by permissions too), uid 1000 inside a user namespace of its own (no capabilities);
- limits: CPU seconds, address space, processes, file size, open files; a wall-clock kill
  of the launcher's process group and of the namespace's pid 1; output capped;
- a scrubbed environment: the program sees only the few variables set here.

On a machine where the namespaces cannot be built, `capabilities()` says what is missing and
`run` refuses unless `SandboxConfig(allow_unsandboxed=True)`; then only the limits, the
scrubbed environment, the temporary directory and the process-group kill apply.
"""

from __future__ import annotations

import ast
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PYTHON = os.path.realpath(sys.executable)
CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
DEFAULT_RO_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/alternatives",
)
NOBODY = 65534
SANDBOX_ENV = {
    "PATH": f"{os.path.dirname(PYTHON)}:/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Limits and policy for one sandboxed run.

    `memory_mb` is an address-space limit per process (RLIMIT_AS), so a run's total is at
    most `max_procs * memory_mb` plus the tmpfs sizes; `cpu_s` is CPU time per process.
    """

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_procs: int = 32
    file_mb: int = 16
    open_files: int = 256
    work_mb: int = 64
    tmp_mb: int = 32
    output_bytes: int = 1 << 20
    ro_paths: tuple[str, ...] = DEFAULT_RO_PATHS
    use_namespaces: bool = True
    allow_unsandboxed: bool = False


@dataclass(frozen=True)
class RunResult:
    """What one run produced. `output_truncated` means the program was killed for output."""

    stdout: bytes
    stderr: bytes
    exit_code: int | None
    signal: int | None
    timed_out: bool
    output_truncated: bool
    wall_s: float
    setup_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.output_truncated)


@dataclass(frozen=True)
class SandboxReport:
    """What the sandbox enforces on this machine, and what it cannot."""

    isolated: bool
    enforced: tuple[str, ...]
    not_enforced: tuple[str, ...]
    error: str | None = None
    details: dict = field(default_factory=dict)


class SandboxUnavailable(RuntimeError):
    """The namespaces could not be built and unsandboxed runs were not allowed."""


ALWAYS = (
    "scrubbed environment (no parent variables)",
    "wall-clock kill of the whole process group",
    "output size cap",
    "CPU-time, address-space, file-size and open-file limits (rlimit)",
    "throw-away working directory",
)
ISOLATED = (
    "no network (own network namespace, loopback down)",
    "own pid namespace: no host processes visible, nothing outlives the run",
    "private read-only root: only /work and /tmp (tmpfs) are writable",
    "no capabilities: uid 1000 in a user namespace of its own",
    "process-count limit (RLIMIT_NPROC, counted per run)",
)
NEVER = (
    "memory is limited per process (RLIMIT_AS), not in total (no cgroup)",
    "no CPU-share limit (no cgroup): up to max_procs busy processes until wall_s",
    "no system-call filter (no seccomp)",
)
UNSANDBOXED_GAPS = (
    "network reachable",
    "host processes visible; a process that calls setsid() can outlive the run",
    "host filesystem writable with the invoking user's rights",
)

_probe_lock = threading.Lock()
_probe_cache: dict[tuple, SandboxReport] = {}


def capabilities(config: SandboxConfig | None = None) -> SandboxReport:
    """Probe (once per process and config) whether the isolated sandbox works here."""
    config = config or SandboxConfig()
    key = (config.use_namespaces, config.ro_paths)
    with _probe_lock:
        if key not in _probe_cache:
            _probe_cache[key] = _probe(config)
        return _probe_cache[key]


def _probe(config: SandboxConfig) -> SandboxReport:
    root = os.geteuid() == 0
    details = {"host_uid": os.geteuid(), "python": PYTHON, "namespaces_requested": True}
    error = None
    if config.use_namespaces:
        res = _launch([PYTHON, "-I", "-S", "-c", "pass"], {}, b"", config, namespaces=True)
        if res.setup_error or res.exit_code != 0:
            error = res.setup_error or f"probe exited {res.exit_code}: {res.stderr[-300:]!r}"
    else:
        details["namespaces_requested"] = False
        error = "namespaces disabled by config (use_namespaces=False)"
    if error is None:
        host_user = "runs as `nobody` on the host" if root else "runs as the invoking uid"
        extra = () if root else ("host files owned by the invoking user are hidden, not locked",)
        return SandboxReport(True, ALWAYS + ISOLATED + (host_user,), NEVER + extra, None, details)
    gaps = UNSANDBOXED_GAPS + (("process-count limit (uid 0 is exempt)",) if root else ())
    return SandboxReport(False, ALWAYS, NEVER + gaps, error, details)


def run(
    argv: Sequence[str],
    *,
    files: Mapping[str, str | bytes] | None = None,
    stdin: bytes | str = b"",
    config: SandboxConfig | None = None,
) -> RunResult:
    """Run `argv` in a fresh sandbox with `files` in its working directory /work.

    Raises SandboxUnavailable when the isolated sandbox cannot be built here and the config
    does not say `allow_unsandboxed=True`.
    """
    config = config or SandboxConfig()
    report = capabilities(config)
    if not report.isolated and not config.allow_unsandboxed:
        raise SandboxUnavailable(
            f"refusing to run untrusted code unsandboxed ({report.error}); missing: "
            + "; ".join(report.not_enforced)
            + ". Set allow_unsandboxed=True only on a machine you can afford to lose."
        )
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return _launch(list(argv), dict(files or {}), data, config, namespaces=report.isolated)


def run_python(
    source: str,
    *,
    files: Mapping[str, str | bytes] | None = None,
    stdin: bytes | str = b"",
    config: SandboxConfig | None = None,
) -> RunResult:
    """Run Python `source` as /work/main.py in the sandbox (stdlib only, no site-packages)."""
    return run(
        [PYTHON, "-I", "-S", "main.py"],
        files={**(files or {}), "main.py": source},
        stdin=stdin,
        config=config,
    )


def _stage_files(files_dir: str, files: Mapping[str, str | bytes]) -> None:
    for rel, content in files.items():
        norm = os.path.normpath(rel)
        if os.path.isabs(norm) or norm == ".." or norm.startswith("../"):
            raise ValueError(f"sandbox file path must be relative and inside /work: {rel!r}")
        path = os.path.join(files_dir, norm)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


def _ro_paths(config: SandboxConfig) -> list[str]:
    paths = list(config.ro_paths)
    # The interpreter may live outside /usr (pyenv, conda, uv): bind its prefix too.
    for extra in (sys.base_prefix, os.path.dirname(os.path.dirname(PYTHON))):
        if not any(extra == p or extra.startswith(p.rstrip("/") + "/") for p in paths):
            paths.append(extra)
    return paths


def _launch(
    argv: list[str],
    files: Mapping[str, str | bytes],
    stdin: bytes,
    config: SandboxConfig,
    namespaces: bool,
) -> RunResult:
    start = time.monotonic()
    stage = tempfile.mkdtemp(prefix="keeprl-sandbox-")
    status_r = status_w = -1
    try:
        files_dir, root_dir = os.path.join(stage, "files"), os.path.join(stage, "root")
        os.mkdir(files_dir)
        os.mkdir(root_dir)
        _stage_files(files_dir, files)
        is_root = os.geteuid() == 0
        status_r, status_w = os.pipe()
        cfg = {
            "argv": argv,
            "env": SANDBOX_ENV,
            "files": files_dir,
            "root": root_dir,
            "namespaces": namespaces,
            "drop_uid": NOBODY if (is_root and namespaces) else None,
            "work_uid": NOBODY if is_root else 0,
            "ro_paths": _ro_paths(config),
            "tmp_mb": config.tmp_mb,
            "work_mb": config.work_mb,
            "status_fd": status_w,
            "limits": {
                "cpu_s": int(config.cpu_s),
                "memory_bytes": config.memory_mb << 20,
                "file_bytes": config.file_mb << 20,
                "open_files": config.open_files,
                "procs": config.max_procs,
            },
        }
        # marshal, not json: the launcher decodes it without importing anything, and both
        # ends are the same interpreter, so the format matches.
        proc = subprocess.Popen(
            [PYTHON, "-I", "-S", CHILD_SCRIPT, marshal.dumps(cfg).hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            start_new_session=True,
            env=SANDBOX_ENV,
        )
        os.close(status_w)
        status_w = -1
        sup = _Supervisor(proc, status_r, config.output_bytes, start + config.wall_s, namespaces)
        sup.communicate(stdin)
        return RunResult(
            stdout=bytes(sup.out[sup.stdout_fd]),
            stderr=bytes(sup.out[sup.stderr_fd]),
            exit_code=sup.status.get("exit"),
            signal=sup.status.get("signal"),
            timed_out=sup.timed_out,
            output_truncated=sup.truncated,
            wall_s=time.monotonic() - start,
            setup_error=sup.status.get("setup_error"),
        )
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(stage, ignore_errors=True)


class _Supervisor:
    """Feeds stdin, reads capped output and status, kills the run on deadline or overflow."""

    def __init__(
        self, proc: subprocess.Popen, status_fd: int, cap: int, deadline: float, namespaces: bool
    ):
        self.proc, self.status_fd, self.cap, self.deadline = proc, status_fd, cap, deadline
        self.namespaces = namespaces
        self.stdout_fd, self.stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
        self.out = {self.stdout_fd: bytearray(), self.stderr_fd: bytearray()}
        self.status: dict = {}
        self._status_buf = bytearray()
        self.stdin_fd = proc.stdin.fileno()
        self.timed_out = self.truncated = False
        self._seen = 0

    def communicate(self, stdin: bytes) -> None:
        proc, sel = self.proc, selectors.DefaultSelector()
        try:
            if stdin:
                os.set_blocking(proc.stdin.fileno(), False)
                sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
            for fd in (*self.out, self.status_fd):
                sel.register(fd, selectors.EVENT_READ)
            self._loop(sel, memoryview(stdin))
        finally:
            sel.close()
            self._kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()
            self._parse_status(drain=True)

    def _loop(self, sel: selectors.BaseSelector, pending: memoryview) -> None:
        grace_until = None
        while sel.get_map():
            now = time.monotonic()
            if now >= self.deadline:
                self.timed_out = grace_until is None
                return
            if grace_until is not None and now >= grace_until:
                return  # launcher is gone; whatever still holds the pipes is being killed
            limit = self.deadline if grace_until is None else min(self.deadline, grace_until)
            for key, _ in sel.select(limit - now):
                fd = key.fd
                if fd == self.stdin_fd:
                    pending = self._feed(sel, fd, pending)
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    sel.unregister(fd)
                    if fd == self.status_fd:
                        grace_until = time.monotonic() + 0.5
                    continue
                if fd == self.status_fd:
                    self._status_buf += data
                    self._parse_status()
                    continue
                keep = max(0, self.cap - self._seen)
                self.out[fd] += data[:keep]
                self._seen += len(data)
                if self._seen > self.cap:
                    self.truncated = True
                    return

    def _feed(self, sel: selectors.BaseSelector, fd: int, pending: memoryview) -> memoryview:
        try:
            pending = pending[os.write(fd, pending[: 1 << 16]) :]
        except BlockingIOError:
            return pending
        except BrokenPipeError:  # the program stopped reading: drop the rest of its input
            pending = pending[:0]
        if not pending:
            sel.unregister(fd)
            self.proc.stdin.close()
        return pending

    def _parse_status(self, drain: bool = False) -> None:
        if drain:
            os.set_blocking(self.status_fd, False)
            try:
                while chunk := os.read(self.status_fd, 1 << 16):
                    self._status_buf += chunk
            except OSError:  # nothing more to read right now
                pass
        *lines, rest = bytes(self._status_buf).split(b"\n")
        self._status_buf = bytearray(rest)
        for line in lines:
            try:
                self.status.update(ast.literal_eval(line.decode()))
            except (ValueError, SyntaxError, UnicodeDecodeError):
                continue

    def _kill(self) -> None:
        self._parse_status(drain=True)
        child = self.status.get("child")
        if child and not self.status.get("reaped"):
            # Kill pid 1 of the sandbox (not yet reaped by the launcher, so the pid is still
            # ours): the kernel then kills everything in its pid namespace, and the launcher
            # reaps pid 1 only once that namespace is empty, so waiting for the launcher
            # means nothing of the run is left when we return.
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Then the launcher's process group: the launcher itself if it is still there, and
        # in unsandboxed mode whatever the program started without leaving the group.
        if self.proc.poll() is None or not self.namespaces:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
