"""Launcher that builds one sandbox and starts the untrusted program inside it.

Run by `rewards.sandbox` as `python -I -S _sandbox_child.py <config>`; never imported.
It uses only built-in modules and ctypes (for the Linux calls Python 3.10 lacks), avoiding
even json, signal and shutil: their imports would double the sandbox's start-up time. The
config arrives marshalled in argv; status lines go back as Python literals.

Three processes take part:
- the launcher (this script's main process) creates the new pid, network, IPC and UTS
  namespaces (plus a user namespace when not run as root), forks, and reports when its
  child is gone;
- that child is pid 1 of the new pid namespace. It makes a private mount namespace,
  builds a fresh root on a tmpfs (read-only bind mounts of the system and Python
  directories, a private /proc, a tiny /dev, tmpfs /tmp and /work), pivots into it, and
  drops to an unprivileged uid in a nested user namespace. Then it forks the program and
  stays as its reaper; when the program exits, pid 1 reports the status and exits, and the
  kernel kills everything else in the namespace;
- the program: resource limits set, no new privileges, exec'd as pid 2.

Progress and errors go to a status pipe as JSON lines, so the parent can tell a sandbox
that failed to build from a program that failed.
"""

import ctypes
import marshal
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24

SIGKILL, SIGPIPE, SIGXFSZ, SIG_DFL = 9, 13, 25, 0  # same on x86_64 and aarch64

# pivot_root has no libc wrapper; its number differs per architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

SANDBOX_UID = 1000  # the uid the program sees inside its own user namespace
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)
STATUS_FD = -1


def status(**fields) -> None:
    os.write(STATUS_FD, (repr(fields) + "\n").encode())


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, target, fstype, flags, data=None) -> None:
    enc = [None if v is None else str(v).encode() for v in (src, target, fstype, data)]
    check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def bind_readonly(src: str, root: str) -> None:
    """Mirror host path `src` at the same place under `root`, read-only."""
    if not os.path.lexists(src):
        return
    dst = root + src
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(src):
        # /bin -> usr/bin on merged-/usr systems: a symlink, not a second mount.
        if not os.path.lexists(dst):
            os.symlink(os.readlink(src), dst)
        return
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        open(dst, "a").close()
    mount(src, dst, None, MS_BIND | MS_REC)
    # A read-only remount must keep the flags the host mount has (the kernel refuses to
    # clear locked ones), so copy them from statvfs.
    host = os.statvfs(src).f_flag
    keep = (MS_NOSUID if host & os.ST_NOSUID else 0) | (MS_NODEV if host & os.ST_NODEV else 0)
    keep |= MS_NOEXEC if host & os.ST_NOEXEC else 0
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


def build_root(cfg: dict) -> None:
    """Create the private filesystem under cfg["root"] and pivot into it."""
    root, uid = cfg["root"], cfg["work_uid"]
    check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    # Private propagation first: nothing mounted below may leak back to the host.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=755")
    for path in cfg["ro_paths"]:
        bind_readonly(path, root)
    os.makedirs(root + "/dev", exist_ok=True)
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "a").close()
        mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for name, fd in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink(f"/proc/self/fd{fd}", f"{root}/dev/{name}")
    tmpfs_opts = "mode=1777,uid=0,gid=0"
    for path, size_mb in (("/dev/shm", cfg["tmp_mb"]), ("/tmp", cfg["tmp_mb"])):
        os.makedirs(root + path, exist_ok=True)
        mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,{tmpfs_opts}")
    os.makedirs(root + "/proc", exist_ok=True)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/work", exist_ok=True)
    work_opts = f"size={cfg['work_mb']}m,mode=700,uid={uid},gid={uid}"
    mount("tmpfs", root + "/work", "tmpfs", MS_NOSUID | MS_NODEV, work_opts)
    copy_files(cfg["files"], root + "/work", uid)
    os.chdir(root)
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(0, f"pivot_root: unknown syscall number on {os.uname().machine}")
    check(libc.syscall(nr, b".", b"."), "pivot_root")
    # The old root now sits under the new one; detach it so the host tree is unreachable.
    check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def copy_files(src: str, dst: str, uid: int) -> None:
    for dirpath, _dirs, names in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target_dir = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(target_dir, exist_ok=True)
        os.chown(target_dir, uid, uid)
        for name in names:
            target = os.path.join(target_dir, name)
            with open(os.path.join(dirpath, name), "rb") as src_file:
                with open(target, "wb") as dst_file:
                    dst_file.write(src_file.read())
            os.chown(target, uid, uid)


def drop_privileges(cfg: dict) -> None:
    """Become an unprivileged uid in a fresh user namespace nested in the sandbox."""
    if cfg["drop_uid"] is not None:
        # Real root on the host: give up every capability and become `nobody`, so host
        # files are protected by ordinary permissions and RLIMIT_NPROC applies (the kernel
        # never applies it to uid 0).
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        os.setgroups([])
        os.setresgid(cfg["drop_uid"], cfg["drop_uid"], cfg["drop_uid"])
        os.setresuid(cfg["drop_uid"], cfg["drop_uid"], cfg["drop_uid"])
        # A uid change clears the parent-death signal and makes /proc/self root-owned.
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    # A new user namespace per run also gives the run its own RLIMIT_NPROC count, so
    # concurrent sandboxes (all `nobody` on the host) do not share one process budget.
    check(libc.unshare(CLONE_NEWUSER), "unshare user namespace")
    write_file("/proc/self/setgroups", "deny")
    write_file("/proc/self/uid_map", f"{SANDBOX_UID} {outer_uid} 1")
    write_file("/proc/self/gid_map", f"{SANDBOX_UID} {outer_gid} 1")
    # No further user namespaces: inside one the program would regain capabilities and
    # could, for instance, mount a tmpfs whose pages no rlimit counts.
    write_file("/proc/sys/user/max_user_namespaces", "0")


def set_limits(cfg: dict) -> None:
    lim = cfg["limits"]
    pairs = {
        resource.RLIMIT_CPU: (lim["cpu_s"], lim["cpu_s"] + 1),
        resource.RLIMIT_AS: (lim["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (lim["file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (lim["open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
        # +1: the reaper (pid 1) shares the program's per-run process count.
        resource.RLIMIT_NPROC: (lim["procs"] + 1,) * 2,
    }
    for which, value in pairs.items():
        resource.setrlimit(which, value)


def child_main(cfg: dict) -> None:
    """Build the sandbox, start the program, and stay as its reaper (pid 1)."""
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if cfg["namespaces"]:
        build_root(cfg)
        libc.sethostname(b"sandbox", 7)  # keep the host's name out of the sandbox
        drop_privileges(cfg)
        workdir = "/work"
    else:
        workdir = cfg["files"]
    os.chdir(workdir)
    # The program is pid 2, not pid 1: the kernel drops default-action signals sent to a
    # namespace's pid 1 (SIGXCPU, SIGTERM, ...), which would blunt the CPU limit.
    pid = os.fork()
    if pid == 0:
        exec_program(cfg)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program may not inspect or trace us
    while True:
        got, wait_status = os.waitpid(-1, 0)  # orphans re-parent to us: reap them too
        if got == pid:
            break
    if os.WIFSIGNALED(wait_status):
        status(signal=os.WTERMSIG(wait_status))
    else:
        status(exit=os.WEXITSTATUS(wait_status))
    # Exiting as pid 1 makes the kernel kill whatever the program left running.
    os._exit(0)


def exec_program(cfg: dict) -> None:
    try:
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        # Python ignores these two, and an ignored signal stays ignored across exec. Reset
        # through libc: Python's own view of the handlers no longer matters after exec.
        for sig in (SIGPIPE, SIGXFSZ):
            libc.signal(sig, SIG_DFL)
        set_limits(cfg)
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        os.set_inheritable(STATUS_FD, False)
        argv = cfg["argv"]
        os.execve(argv[0], argv, cfg["env"])
    except BaseException as exc:
        status(setup_error=f"cannot start {cfg['argv'][0]}: {type(exc).__name__}: {exc}")
    os._exit(127)


def launcher_main(cfg: dict) -> None:
    if cfg["namespaces"]:
        flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        if cfg["drop_uid"] is None:
            flags |= CLONE_NEWUSER  # not root: a user namespace grants the mount rights
        uid, gid = os.geteuid(), os.getegid()
        check(libc.unshare(flags), "unshare")
        if flags & CLONE_NEWUSER:
            write_file("/proc/self/setgroups", "deny")
            write_file("/proc/self/uid_map", f"0 {uid} 1")
            write_file("/proc/self/gid_map", f"0 {gid} 1")
    pid = os.fork()
    if pid == 0:
        try:
            child_main(cfg)
        except BaseException as exc:  # report any setup failure, then die quietly
            status(setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(125)
    status(child=pid)
    os.waitpid(pid, 0)
    status(reaped=True)


def main() -> None:
    global STATUS_FD
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    STATUS_FD = cfg["status_fd"]
    try:
        launcher_main(cfg)
    except BaseException as exc:
        status(setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(125)


if __name__ == "__main__":
    main()
