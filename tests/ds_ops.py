"""DeepSpeed's CPU ops (shared-memory collectives, CPU Adam, async I/O), built once per test session in the background.

DeepSpeed compiles these on first use, minutes each on 2 cores, and the NVMe op needs libaio's
header, which apt-get installs when absent. The conftest starts `prebuild()` as a subprocess
(niced in a serial run) as soon as a test that needs them is collected, and moves those tests to
the end of the run, so the compiler gets the cycles other tests leave idle (waits on timeouts, schedulers,
process start-up). A test that needs an op calls `wait()` first; a build still under way then
holds that test only for what is left of it. torch's extension loader takes a file lock, so a
build the test starts itself (the prebuild failed, or was not started) is still correct.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

LIBAIO_HEADER = Path("/usr/include/libaio.h")
_process: Optional[subprocess.Popen] = None
_done: Optional[Path] = None


def install_libaio() -> Optional[str]:
    """None where libaio's header is present (installed with apt-get when absent and possible),
    else the reason."""
    if LIBAIO_HEADER.exists():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "libaio is not installed and cannot be (needs root and apt-get: apt-get install libaio-dev)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "--no-install-recommends", "libaio-dev"], ["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", "libaio-dev"]):
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        except (subprocess.TimeoutExpired, OSError) as error:
            return f"{' '.join(cmd)}: {error}"
        if LIBAIO_HEADER.exists():
            return None
    return "apt-get could not install libaio-dev"


def prebuild() -> int:
    """Install libaio if needed, then build (or load from torch's extension cache) both ops."""
    problem = install_libaio()
    if problem:
        print(f"async I/O op not built: {problem}", flush=True)
    from deepspeed.accelerator import get_accelerator

    # The builders DeepSpeed itself picks for this accelerator, so the cached builds are the ones
    # its loads find (the same sources and flags).
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder", "AsyncIOBuilder", "PinMemoryBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            continue
        if not builder.is_compatible(verbose=False):
            print(f"{builder.name}: not compatible here, not built", flush=True)
            continue
        started = time.time()
        builder.load(verbose=False)
        print(f"{builder.name}: ready in {time.time() - started:.0f} s", flush=True)
    return 0


def _done_file(log_dir: Path) -> Path:
    """Written when this session's build has ended; one name per session (pytest-xdist gives its
    workers one run id), so a file of an earlier session is never taken for it."""
    return log_dir / f"deepspeed_ops_prebuild.{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'serial')}.done"


def _prebuild_then_mark(done: str) -> int:
    try:
        return prebuild()
    finally:
        Path(done).touch()


def start(log_dir: Path, build_here: bool = True) -> None:
    """Start `prebuild()` in a subprocess (once per session). `build_here=False` (a second
    pytest-xdist worker): another process of the session builds; `wait()` then polls for its end."""
    global _process, _done
    if _process is not None or _done is not None or os.environ.get("FLIP_TEST_NO_PREBUILD"):
        return
    try:
        import deepspeed  # noqa: F401  (only where the engine is installed)
    except ImportError:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    _done = _done_file(log_dir)
    if not build_here:
        return
    for old in log_dir.glob("deepspeed_ops_prebuild.*.done"):
        old.unlink(missing_ok=True)
    command = [sys.executable, "-c", "import sys, ds_ops; sys.exit(ds_ops._prebuild_then_mark(sys.argv[1]))", str(_done)]
    # Niced in a serial run, whose waits leave a core idle about half the time. Under pytest-xdist
    # the two workers keep both cores busy, so a niced build got almost nothing until the end and
    # every DeepSpeed test waited for it (a fresh machine's `-n 2` run: 7 minutes longer).
    if shutil.which("nice") and not os.environ.get("PYTEST_XDIST_WORKER"):
        command = ["nice", "-n", "19", *command]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    with open(log_dir / "deepspeed_ops_prebuild.log", "w") as log:
        _process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait(timeout: float = 900.0) -> None:
    """Wait for the background build, if one was started here or by another worker of the
    session; its failure is not an error here (the test then builds, or skips with its own
    reason)."""
    if _process is not None:
        try:
            _process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return
    if _done is not None:  # another worker's build: its done-file, written however it ended
        deadline = time.time() + timeout
        while not _done.exists() and time.time() < deadline:
            time.sleep(1)


def stop() -> None:
    """At the end of the session: leave a build that is still running to finish (killing it
    would leave torch's build lock behind), reap one that has ended."""
    if _process is not None:
        _process.poll()
