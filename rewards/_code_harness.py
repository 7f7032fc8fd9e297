"""Test harness copied into the code sandbox as /work/harness.py; never imported.

As the sandbox's main program it reads a job (JSON) from stdin, makes itself non-dumpable
so the solution, which runs as the same uid, cannot read its memory or write to its pipes,
and then runs the solution in child processes:
- "io" jobs: `solution.py` once per case with the case's stdin, output compared line by
  line (trailing whitespace ignored); the expected outputs exist only in this process;
- "test" jobs: itself again in "run" mode, which executes solution.py then the
  instrumented test.py; each instrumented assert prints a "KEEPRL-CASE <i> <0|1>" line.
It ends by printing "KEEPRL-RESULT <nonce> <json>", the nonce known only to this process.
Child output goes to files on the sandbox's size-limited /tmp, never into this process's
memory in bulk.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys

PR_SET_DUMPABLE = 4
READ_CAP = 1 << 20


def run_child(argv: list, stdin: str, timeout_s: float, out_path: str) -> tuple:
    """Run one child in its own process group; return (exit code or None, stdout text)."""
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            proc.communicate(stdin.encode(), timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        except OSError:  # e.g. the child closed stdin early and we hit a broken pipe
            code = proc.wait(timeout=timeout_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
            except OSError:
                pass
            proc.wait()
    with open(out_path, "rb") as f:
        return code, f.read(READ_CAP).decode("utf-8", "replace")


def same_output(got: str, want: str) -> bool:
    def lines(text: str) -> list:
        out = [line.rstrip() for line in text.strip("\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out

    return lines(got) == lines(want)


def run_io(job: dict) -> list:
    passed = []
    for i, case in enumerate(job["cases"]):
        argv = [sys.executable, "-I", "-S", "solution.py"]
        code, out = run_child(argv, case["input"], job["case_timeout_s"], f"/tmp/out{i}")
        passed.append(code == 0 and same_output(out, case["output"]))
    return passed


def run_test(job: dict) -> list:
    whole = "whole" if job.get("whole") else "cases"
    argv = [sys.executable, "-I", "-S", "harness.py", "run", whole, job["entry_point"]]
    _, out = run_child(argv, "", job["case_timeout_s"], "/tmp/out")
    passed = [False] * job["total"]
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "KEEPRL-CASE" and parts[1].isdigit():
            i = int(parts[1])
            if i < len(passed):
                passed[i] = parts[2] == "1"
    return passed


def run_mode(whole: bool, entry_point: str) -> None:
    """Child of a "test" job: load the solution, then the instrumented tests, then check()."""
    sys.setrecursionlimit(10_000)
    namespace = {"__name__": "solution"}  # keep the solution's `if __name__ == "__main__"` off
    with open("solution.py") as f:
        exec(compile(f.read(), "solution.py", "exec"), namespace)
    with open("test.py") as f:
        exec(compile(f.read(), "test.py", "exec"), namespace)
    if entry_point:
        namespace["check"](namespace[entry_point])
        if whole:  # check() has no top-level assert: returning is passing
            print("\nKEEPRL-CASE 0 1", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        run_mode(sys.argv[2] == "whole", sys.argv[3])
        return
    job = json.loads(sys.stdin.read())
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    passed = run_io(job) if job["mode"] == "io" else run_test(job)
    result = {"passed": sum(passed), "total": len(passed), "cases": [int(p) for p in passed]}
    sys.stdout.write(f"\nKEEPRL-RESULT {job['nonce']} {json.dumps(result)}\n")


if __name__ == "__main__":
    main()
