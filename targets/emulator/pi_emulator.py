"""An emulated Raspberry Pi (aarch64) TVM RPC server for this x86 machine.

``setup`` builds an arm64 Debian bookworm root (Python 3.11) holding the aarch64 wheels of TVM's
runtime; ``serve`` runs ``arm_server.py`` in it under QEMU user-mode emulation, so cross-compiled
aarch64 libraries can be measured over TVM RPC on 127.0.0.1 without a Pi. Emulated timings
measure QEMU on this host, not a Pi.

    python targets/emulator/pi_emulator.py setup [--root DIR]
    python targets/emulator/pi_emulator.py serve --port 9500 [--tracker HOST:PORT --key KEY]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
ARM_SERVER = HERE / "arm_server.py"

HOST_PACKAGES = (
    "qemu-user-static",
    "debootstrap",
    "gcc-aarch64-linux-gnu",
    "binutils-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",  # crti.o etc.: only a Recommends of the cross gcc, needed to link .so
)
RELEASE = "bookworm"  # Debian 12: its python3.11 matches the x86 venv's ABI for the wheels
MIRROR = "http://deb.debian.org/debian"
PYTHON = "usr/bin/python3.11"
SITE = "usr/local/lib/python3.11/dist-packages"  # on Debian's sys.path, so no PYTHONPATH needed
WHEELS = (
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",  # 0.1.15 segfaults in TVM 0.27 (shared README)
    "numpy==2.4.6",
    "psutil==7.2.2",  # the RPC server kills timed-out sessions' children with it
    "cloudpickle==3.1.3",
)
# pip does not widen one manylinux_2_N tag to older glibcs, so list every one bookworm's 2.36 runs.
PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{n}_aarch64" for n in range(17, 37)]
# Unused by the RPC server: the 240 MB compiler library (runtime-only mode,
# TVM_USE_RUNTIME_LIB=1), the downloaded debs and documentation.
PRUNE = (
    f"{SITE}/tvm/lib/libtvm_compiler.so",
    "var/cache/apt/archives",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
)
MARKER = ".search-pi-root.json"
SPEC = {"release": RELEASE, "wheels": list(WHEELS), "version": 1}
QEMU = "qemu-aarch64-static"
QEMU_CPU = "cortex-a72"  # the Pi 4's core: an instruction it lacks faults here too (Pi 5: a76)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def log(msg: str) -> None:
    print(f"pi-emulator: {msg}", file=sys.stderr, flush=True)


def default_root() -> Path:
    cache = os.environ.get("SEARCH_CACHE_DIR")
    return (Path(cache) if cache else Path.home() / ".cache" / "search") / "pi-root"


def run(cmd: list[str], **kwargs: object) -> None:
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit(f"pi-emulator: {why} needs root (apt-get, debootstrap's device nodes)")


def missing_host_packages() -> list[str]:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *HOST_PACKAGES],
        capture_output=True,
        text=True,
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in HOST_PACKAGES if p not in installed]


def ensure_host_packages() -> None:
    """Install the emulator and cross toolchain; refresh apt lists only when the install fails."""
    missing = missing_host_packages()
    if not missing:
        return
    require_root(f"installing {' '.join(missing)}")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing {' '.join(missing)}")
    if subprocess.run(install, env=env).returncode != 0:
        run(["apt-get", "update"], env=env)
        run(install, env=env)


def root_ready(root: Path) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == SPEC
    except (OSError, ValueError):
        return False


def extract_base(root: Path) -> None:
    """Unpack the debs debootstrap's second stage would install (Python 3.11 among them).

    The second stage needs chroot + exec of arm64 binaries (binfmt_misc, absent here); unpacking
    without maintainer scripts is enough to run Python.
    """
    paths = dict(
        line.split(" ", 1) for line in (root / "debootstrap/debpaths").read_text().splitlines()
    )
    for pkg in (root / "debootstrap/base").read_text().split():
        deb = root / paths[pkg].lstrip("/")
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        # Keep merged-/usr symlinks (lib -> usr/lib) instead of replacing them by directories.
        run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)], stdin=tar.stdout)
        if tar.wait() != 0:
            raise RuntimeError(f"cannot unpack {deb}")


def install_wheels(root: Path) -> None:
    """Install the aarch64 cp311 wheels from the x86 side: pip runs fine for another platform."""
    platforms = [arg for plat in PLATFORMS for arg in ("--platform", plat)]
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            "--target",
            str(root / SITE),
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            *platforms,
            *WHEELS,
        ]
    )


def qemu_python(root: Path, *args: str, cpu: str = QEMU_CPU) -> list[str]:
    return [QEMU, "-cpu", cpu, "-L", str(root), str(root / PYTHON), "-I", *args]


def qemu_env() -> dict[str, str]:
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}  # python -I ignores the x86 PYTHON* vars
    env.setdefault("TVM_NUM_THREADS", "1")  # the host is shared; set it to measure threading
    return env


def build_root(root: Path) -> None:
    """Build into ROOT.partial and rename, so an interrupted setup never looks complete."""
    require_root("building the arm64 root")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"debootstrap {RELEASE} arm64 into {partial}")
    run(
        [
            "debootstrap",
            "--arch=arm64",
            "--foreign",
            "--variant=minbase",
            "--include=python3.11",
            RELEASE,
            str(partial),
            MIRROR,
        ],
        stdout=subprocess.DEVNULL,
    )
    extract_base(partial)
    log("installing aarch64 wheels")
    install_wheels(partial)
    for rel in PRUNE:
        path = partial / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    probe = "import tvm, tvm_ffi, numpy; print(tvm.__version__, tvm_ffi.__version__)"
    out = subprocess.run(
        qemu_python(partial, "-c", probe),
        env=qemu_env(),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    log(f"arm64 python imports tvm {out}")
    (partial / MARKER).write_text(json.dumps(SPEC))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)


def setup(root: Path) -> Path:
    """Idempotent: seconds when the marker matches SPEC; a file lock serialises parallel calls."""
    ensure_host_packages()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not root_ready(root):
            build_root(root)
    return root


def _die_with_parent() -> None:
    """Have the kernel SIGTERM the emulator if this script dies uncleanly (Popen.kill())."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(root: Path, host: str, port: int, tracker: str | None, key: str, cpu: str) -> int:
    """Run the aarch64 server in the foreground; SIGTERM/SIGINT end its whole process group."""
    setup(root)
    cmd = qemu_python(root, str(ARM_SERVER), "--host", host, "--port", str(port), cpu=cpu)
    if tracker:
        cmd += ["--tracker", tracker, "--key", key]
    child = subprocess.Popen(
        cmd, env=qemu_env(), start_new_session=True, preexec_fn=_die_with_parent
    )
    stopped: list[tuple[int, float]] = []  # (signal, when)

    def stop(signum: int, _frame: FrameType | None) -> None:
        # Only signal here: a Popen.wait() inside a handler deadlocks on the interrupted one's lock.
        stopped.append((signum, time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while child.poll() is None:
        time.sleep(0.1)
        if stopped and time.monotonic() > stopped[0][1] + 10:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    return 128 + stopped[0][0] if stopped else child.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup", help="prepare the arm64 root (cached)")
    p_serve = sub.add_parser("serve", help="run the emulated Pi's RPC server in the foreground")
    for p in (p_setup, p_serve):
        p.add_argument("--root", type=Path, default=default_root())
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, required=True)
    p_serve.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
    p_serve.add_argument("--key", default="", help="device key registered with the tracker")
    p_serve.add_argument(
        "--cpu", default=QEMU_CPU, help="QEMU CPU model (cortex-a76 for a Pi 5, max for all)"
    )
    args = parser.parse_args(argv)
    if args.command == "setup":
        start = time.monotonic()
        setup(args.root.resolve())
        log(f"root ready at {args.root} ({time.monotonic() - start:.1f} s)")
        return 0
    if args.tracker and not args.key:
        parser.error("--tracker needs --key")
    return serve(args.root.resolve(), args.host, args.port, args.tracker, args.key, args.cpu)


if __name__ == "__main__":
    sys.exit(main())
