"""A CPU budget for a process tree: a cgroup whose CFS bandwidth control lets the processes in it use at most
`cores` CPUs' worth of time per period, for measuring how a server's throughput scales with the CPU it is given
on a machine whose cores the load generator and the upstream share (bench/proxy_bench.py's two-worker cell).

Kernel interface (Documentation/admin-guide/cgroup-v1/cgroups.rst, Documentation/scheduler/sched-bwc.rst and,
for cgroup v2, Documentation/admin-guide/cgroup-v2.rst "cpu.max"):
- cgroup v1: a directory under the `cpu` controller's mount, `cpu.cfs_period_us` and `cpu.cfs_quota_us`
  (microseconds; the quota may exceed the period, to give more than one CPU);
- cgroup v2: a directory under the unified mount with `cpu` in its parent's `cgroup.subtree_control`,
  `cpu.max` as "<quota> <period>".
A process is moved by writing its pid to the group's `cgroup.procs` (all its threads go with it); its children
started afterwards are born in it. Needs root, or a delegated cgroup; `unavailable()` says why not.
"""

from __future__ import annotations

from pathlib import Path

import psutil

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
PERIOD_US = 20_000  # a short period: a capped server stalls for at most part of 20 ms, not of the default 100


def _hierarchy() -> tuple[str, Path] | None:
    if (V1 / "cpu.cfs_quota_us").exists():
        return "v1", V1
    controllers = V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return "v2", V2
    return None


def unavailable() -> str | None:
    """Why no CPU budget can be set here (no cgroup cpu controller, or no permission to use it); None if one can."""
    found = _hierarchy()
    if found is None:
        return "no cgroup cpu controller is mounted"
    version, root = found
    probe = root / "ollama-guard-bench-probe"
    try:
        if version == "v2" and "cpu" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+cpu")
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as exc:
        return f"cannot create a cgroup under {root}: {exc.strerror} (run as root)"
    return None


def _current(pid: int, version: str) -> str:
    """The cgroup path (relative to the hierarchy's mount) `pid` is in now, from /proc/<pid>/cgroup."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (version == "v2" and controllers == "") or (version == "v1" and "cpu" in controllers.split(",")):
            return path
    return "/"


class CpuBudget:
    """A cgroup capping the CPU time of the process trees `add`ed to it at `cores` CPUs (0.5: half of one CPU's
    time per period, however many threads and processes share it). `close()` moves them back where they were and
    removes the group. Raises OSError where `unavailable()` is not None."""

    def __init__(self, name: str, cores: float) -> None:
        found = _hierarchy()
        if found is None:
            raise OSError("no cgroup cpu controller is mounted")
        self.version, self.root = found
        self.path = self.root / f"ollama-guard-bench-{name}"
        self.path.mkdir(exist_ok=True)
        quota = max(1000, int(PERIOD_US * cores))
        if self.version == "v1":
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        self.cores = cores
        self.origins: dict[int, str] = {}  # pid -> the group it came from

    def add(self, pid: int) -> None:
        """Moves the process `pid` and its descendants into the budget."""
        parent = psutil.Process(pid)
        for proc in [parent, *parent.children(recursive=True)]:
            self.origins[proc.pid] = _current(proc.pid, self.version)
            (self.path / "cgroup.procs").write_text(str(proc.pid))

    def close(self) -> None:
        """Moves the processes back to their groups (those still running) and removes this one."""
        for pid, origin in self.origins.items():
            try:
                (self.root / origin.lstrip("/") / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass  # the process has ended
        for line in (self.path / "cgroup.procs").read_text().split():  # children born in the group
            try:
                (self.root / "cgroup.procs").write_text(line)
            except OSError:
                pass
        self.path.rmdir()
