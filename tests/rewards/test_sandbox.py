"""Sandbox attacks: each is contained with reward 0 and leaves the host unaffected.

Every attack is a code task whose expected output the program prints only if the attack
worked, so a contained attack scores 0. Attacks aim only at canaries these tests create,
never at real host files, so a regression cannot damage the machine. After each, the test
checks the host: canaries intact, sentinel processes alive, no process left with the
attack's marker, no staging directory left behind.
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from rewards import Sample, sandbox
from rewards.code import verify_code


def _io_task(program: str, expected: str, stdin: str = "") -> Sample:
    return Sample("", program, {"io": [{"input": stdin, "output": expected}]})


def _procs_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture
def canary_dir():
    """A world-writable directory in the host's /tmp holding a world-writable file: only
    the sandbox's private filesystem, not file permissions, can protect it."""
    path = tempfile.mkdtemp(prefix="keeprl-canary-", dir="/tmp")
    os.chmod(path, 0o777)
    canary = os.path.join(path, "canary.txt")
    with open(canary, "w") as f:
        f.write("intact")
    os.chmod(canary, 0o666)
    yield path
    for name in os.listdir(path):
        os.remove(os.path.join(path, name))
    os.rmdir(path)


def _assert_canary(path: str) -> None:
    assert sorted(os.listdir(path)) == ["canary.txt"]
    with open(os.path.join(path, "canary.txt")) as f:
        assert f.read() == "intact"


def test_this_machine_is_isolated():
    report = sandbox.capabilities()
    assert report.isolated, report.error
    assert any("no network" in item for item in report.enforced)
    assert report.not_enforced  # honest about the gaps (per-process memory, no seccomp)


def test_infinite_loop():
    start = time.monotonic()
    score = verify_code(_io_task("while True:\n    pass\nprint('done')", "done"), case_timeout_s=1)
    assert score["reward"] == 0.0
    assert time.monotonic() - start < 5
    res = sandbox.run_python("while True: pass", config=sandbox.SandboxConfig(wall_s=1, cpu_s=30))
    assert res.timed_out and not res.ok and res.wall_s < 3


def test_cpu_limit_kills_before_wall_clock():
    res = sandbox.run_python("while True: pass", config=sandbox.SandboxConfig(wall_s=20, cpu_s=1))
    assert not res.timed_out and res.signal == signal.SIGXCPU
    assert res.wall_s < 5


def test_fork_bomb_is_capped_and_does_not_starve_other_runs():
    marker = f"keeprl-forkbomb-{secrets.token_hex(4)}"
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    cfg = sandbox.SandboxConfig(wall_s=3, max_procs=16)
    results = {}
    runner = threading.Thread(
        target=lambda: results.setdefault(
            "bomb", sandbox.run([sandbox.PYTHON, "-I", "-S", "-c", bomb, marker], config=cfg)
        )
    )
    runner.start()
    time.sleep(1.0)
    # While the bomb runs: it holds at most max_procs processes, and a legit run that
    # needs processes of its own still works (the limit is counted per run).
    # 16 bomb processes, plus the launcher and the namespace's reaper (same argv).
    assert len(_procs_with(marker)) <= 16 + 2
    legit = (
        "import subprocess\nfor _ in range(5):\n"
        "    subprocess.run(['true'], check=True)\nprint('ok')"
    )
    assert sandbox.run_python(legit, config=cfg).stdout == b"ok\n"
    runner.join()
    assert results["bomb"].timed_out
    assert _procs_with(marker) == []
    assert verify_code(_io_task(bomb + "print('x')", "x"), case_timeout_s=1)["reward"] == 0.0


def test_memory_bomb():
    program = "x = bytearray(8 << 30)\nprint('allocated')"
    assert verify_code(_io_task(program, "allocated"))["reward"] == 0.0
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))"
    res = sandbox.run_python(grow, config=sandbox.SandboxConfig(memory_mb=256))
    assert not res.ok and b"MemoryError" in res.stderr and not res.timed_out


def test_huge_output():
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    res = sandbox.run_python(flood, config=sandbox.SandboxConfig(output_bytes=1 << 16))
    assert res.output_truncated and not res.ok
    assert len(res.stdout) <= 1 << 16 and res.wall_s < 5
    # Through the verifier the flood goes to a size-limited file and the case fails.
    assert verify_code(_io_task(flood, "x"), case_timeout_s=2)["reward"] == 0.0


def test_network_connect():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    program = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'leak')\nprint('connected')"
    )
    try:
        assert verify_code(_io_task(program, "connected"))["reward"] == 0.0
        res = sandbox.run_python(program)
        assert b"Network is unreachable" in res.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the host's loopback
    finally:
        server.close()


def test_parent_environment_secrets(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("KEEPRL_TEST_SECRET", secret)
    program = (
        "import os\n"
        "seen = [os.environ.get('KEEPRL_TEST_SECRET', '')]\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        "        seen.append(open(f'/proc/{pid}/environ').read())\n"
        "    except OSError:\n"
        "        pass\n"
        "print(' '.join(seen))"
    )
    assert verify_code(_io_task(program, secret))["reward"] == 0.0
    res = sandbox.run_python(program)
    assert res.ok and secret.encode() not in res.stdout


def test_write_outside_workdir(canary_dir):
    canary = os.path.join(canary_dir, "canary.txt")
    program = (
        "wrote = []\n"
        f"for path in [{canary!r}, {canary_dir + '/new.txt'!r}, '/work/../escape', '/usr/x']:\n"
        "    try:\n"
        "        open(path, 'w').write('pwned')\n"
        "        wrote.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "print('wrote' if wrote else 'blocked')"
    )
    assert verify_code(_io_task(program, "wrote"))["reward"] == 0.0
    res = sandbox.run_python(program)
    # The host's /tmp is not even visible: the sandbox's /tmp is its own tmpfs.
    assert res.stdout == b"blocked\n" or b"/work/../escape" not in res.stdout
    _assert_canary(canary_dir)
    assert not os.path.exists("/escape")


def test_delete_files(canary_dir):
    program = (
        "import os, shutil\n"
        f"for act in (lambda: os.remove({canary_dir + '/canary.txt'!r}),\n"
        f"            lambda: shutil.rmtree({canary_dir!r})):\n"
        "    try:\n"
        "        act()\n"
        "        print('deleted')\n"
        "    except OSError:\n"
        "        pass\n"
        "import glob\n"
        "print(len(glob.glob('/*')))"
    )
    assert verify_code(_io_task(program, "deleted"))["reward"] == 0.0
    _assert_canary(canary_dir)


def test_kill_the_parent():
    # A host process running as the sandbox's own host uid: only the pid namespace, not
    # permissions, keeps it out of reach.
    kwargs = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    sentinel = subprocess.Popen(["sleep", "60"], **kwargs)
    program = (
        "import os, signal\n"
        f"for pid in (os.getppid(), {os.getpid()}, {sentinel.pid}, -1, 1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "print('survived')"
    )
    try:
        assert verify_code(_io_task(program, "killed"))["reward"] == 0.0
        sandbox.run_python(program)
        assert sentinel.poll() is None, "a host process was killed from the sandbox"
    finally:
        sentinel.kill()
        sentinel.wait()


def test_background_process_does_not_outlive_the_run(monkeypatch):
    marker = f"keeprl-bg-{secrets.token_hex(4)}"
    program = (
        "import os, subprocess, sys\n"
        "code = 'import time; time.sleep(600)'\n"
        f"subprocess.Popen([sys.executable, '-c', code, {marker!r}], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', code, {marker!r}])\n"
        "print('left behind')"
    )
    staged = []  # this run's host staging directories, to check they are removed
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(
        tempfile, "mkdtemp", lambda **kw: staged.append(real_mkdtemp(**kw)) or staged[-1]
    )
    res = sandbox.run_python(program)
    assert res.ok and res.stdout == b"left behind\n"
    assert _procs_with(marker) == []
    assert verify_code(_io_task(program, "nothing"))["reward"] == 0.0
    assert _procs_with(marker) == []
    assert len(staged) >= 2 and not any(os.path.exists(path) for path in staged)


def test_no_new_user_namespaces_or_mounts():
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), libc.unshare(0x00020000))\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])"
    )
    res = sandbox.run_python(program)
    assert res.stdout.split() == [b"-1", b"-1", b"0000000000000000"]


def test_refuses_to_run_unsandboxed_unless_allowed():
    cfg = sandbox.SandboxConfig(use_namespaces=False)
    report = sandbox.capabilities(cfg)
    assert not report.isolated
    assert any("network" in gap for gap in report.not_enforced)
    with pytest.raises(sandbox.SandboxUnavailable, match="allow_unsandboxed"):
        sandbox.run_python("print(1)", config=cfg)
    allowed = sandbox.SandboxConfig(use_namespaces=False, allow_unsandboxed=True, wall_s=5)
    res = sandbox.run_python("import os\nprint(sorted(os.listdir('.')))", config=allowed)
    assert res.ok and res.stdout == b"['main.py']\n"


def test_stdin_files_and_exit_codes():
    files = {"data/in.txt": "from a file"}
    program = "import sys\nprint(open('data/in.txt').read(), sys.stdin.read())\nsys.exit(3)"
    res = sandbox.run_python(program, files=files, stdin="x" * 200_000)
    assert res.exit_code == 3 and res.stdout.startswith(b"from a file xxx")
    assert len(res.stdout) == len("from a file ") + 200_000 + 1
    with pytest.raises(ValueError, match="inside /work"):
        sandbox.run_python("", files={"../x": ""})


def test_host_python_is_not_the_sandbox_env():
    # The sandbox sees none of this process's variables, only the fixed set it is given.
    res = sandbox.run_python("import os\nprint(sorted(os.environ))")
    assert res.stdout.decode().strip() == str(sorted(sandbox.SANDBOX_ENV))
    assert sys.executable  # the host interpreter is untouched


def test_signal_dispositions_are_reset_for_the_program():
    # `yes` must die quietly of SIGPIPE; under an inherited SIG_IGN it would print an error.
    res = sandbox.run(["/bin/sh", "-c", "yes | head -n 1"])
    assert res.ok and res.stdout == b"y\n" and res.stderr == b""


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root to start an unprivileged user, and a system Python it can read",
)
def test_works_for_an_unprivileged_host_user():
    # Without root, the launcher makes its own user namespace instead of dropping to nobody.
    script = (
        f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.dirname(sandbox.__file__))!r})\n"
        "from rewards import sandbox\n"
        "assert sandbox.capabilities().isolated, sandbox.capabilities().error\n"
        "res = sandbox.run_python('import os, socket\\nprint(os.getuid())\\n"
        'socket.create_connection(("127.0.0.1", 9), timeout=1)\')\n'
        "print(res.stdout.decode().strip(), b'unreachable' in res.stderr)\n"
    )
    out = subprocess.run(
        [SYSTEM_PYTHON, "-c", script],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000", "True"]
