"""A two-node Slurm cluster on one machine: two network namespaces joined by a veth pair (10.231.0.1
and 10.231.0.2, addresses that exist inside the namespaces only, `lo` up in each; Slurm's network)
and a second one (10.232.0.1 and .2, `flipd`: the ranks' data network when a test gives them its
address and interface, which `drop_data` silences without closing anything), a `slurmd` in
each (`slurmd -N flipn1|flipn2`, its NodeAddr the namespace's address, spool / pid / log per node
through %n), one `slurmctld` in the first namespace and one `munged` on the host, whose socket (a
file) every namespace sees. Client commands (sbatch, scontrol, ...) run in the first namespace.

The daemons enter a namespace with `nsenter --net=/run/netns/NAME`, not `ip netns exec`: the latter
also mounts a fresh /sys for the namespace, without /sys/fs/cgroup, and slurmd then refuses to start
("No filesystem mounted on /sys/fs/cgroup ... slurmd initialization failed").

Everything it starts is stopped by pid, and the namespaces (with the veth pair) are deleted, in
`stop()`. The ports, directories and ClusterName are its own, so a `tests/test_slurm.py` cluster on
the host may run at the same time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_slurm import LocalSlurm, _sbin  # noqa: E402

NODES = ("flipn1", "flipn2")
ADDRESSES = ("10.231.0.1", "10.231.0.2")
INTERFACE = "flip0"  # the veth end's name inside each namespace (GLOO_SOCKET_IFNAME for the ranks)
DATA_ADDRESSES = ("10.232.0.1", "10.232.0.2")
DATA_INTERFACE = "flipd"  # the data network's veth end inside each namespace


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def namespaces_refused() -> str | None:
    """Why this machine cannot make network namespaces and veth pairs (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    name = f"flipprobe{os.getpid()}"
    try:
        made = _ip("netns", "add", name)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"ip netns add cannot run: {error}"
    if made.returncode != 0:
        return f"the kernel refuses network namespaces: ip netns add: {made.stderr.strip()}"
    try:
        veth = _ip("link", "add", f"{name[:10]}a", "type", "veth", "peer", "name", f"{name[:10]}b")
        if veth.returncode != 0:
            return f"the kernel refuses veth pairs: ip link add ... type veth: {veth.stderr.strip()}"
        _ip("link", "del", f"{name[:10]}a")
    finally:
        _ip("netns", "del", name)
    return None


class TwoNodeSlurm(LocalSlurm):
    """munged + slurmctld + two slurmd, each node in its own network namespace."""

    def __init__(self, root: Path):
        super().__init__(root)
        tag = str(os.getpid())[-6:]
        self.netns = {node: f"flip{tag}{node[-1]}" for node in NODES}
        self.made_netns: list[str] = []

    def in_node(self, node: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}"]

    def _network(self) -> None:
        for node in NODES:
            self._check(_ip("netns", "add", self.netns[node]), "ip netns add")
            self.made_netns.append(self.netns[node])
        for suffix, interface, addresses in (("v", INTERFACE, ADDRESSES), ("d", DATA_INTERFACE, DATA_ADDRESSES)):
            ends = [f"{self.netns[node]}{suffix}" for node in NODES]
            self._check(_ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1]), "ip link add veth")
            for node, end, address in zip(NODES, ends, addresses):
                ns = self.netns[node]
                self._check(_ip("link", "set", end, "netns", ns), "ip link set netns")
                self._check(_ip("-n", ns, "link", "set", end, "name", interface), "ip link set name")
                self._check(_ip("-n", ns, "addr", "add", f"{address}/24", "dev", interface), "ip addr add")
                for device in ("lo", interface):
                    self._check(_ip("-n", ns, "link", "set", device, "up"), "ip link set up")

    def drop_data(self, drop: bool = True) -> None:
        """Silence the data network (every packet either way dropped at the sender, nothing closed
        or refused: a root queue of length 0 on both ends), or (drop=False) bring it back. The
        kernel here has neither netem nor iptables; a `pfifo limit 0` queue is the same loss."""
        for node in NODES:
            ns = self.netns[node]
            if drop:
                self._check(subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", DATA_INTERFACE,
                                            "root", "pfifo", "limit", "0"], capture_output=True, text=True, timeout=30),
                            "tc qdisc replace ... pfifo limit 0")
            else:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", DATA_INTERFACE, "root"],
                               capture_output=True, text=True, timeout=30)

    @staticmethod
    def _check(proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()}")

    def start(self) -> None:
        self._network()
        socket_path = self._start_munge()
        for node in NODES:
            (self.root / "spool" / node).mkdir()
        # Two tasks of one CPU on each node, whatever this machine has (the nodes share its cores).
        cpus = max(2, int(subprocess.run(["getconf", "_NPROCESSORS_ONLN"], capture_output=True, text=True).stdout or 2))
        nodes = "\n".join(f"NodeName={node} NodeAddr={address} NodeHostname={self.host} CPUs={cpus} RealMemory=1000 "
                          "State=UNKNOWN" for node, address in zip(NODES, ADDRESSES))
        self._write_conf("fliptwonode", ADDRESSES[0], socket_path,
                         f"{nodes}\nPartitionName=twonode Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                         per_node=True,
                         # A node that stops answering is DOWN after this many seconds (the default is 300).
                         extra="SlurmdTimeout=6\n")
        self._daemon("slurmctld", [*self.in_node(NODES[0]), _sbin("slurmctld")], self.root / "slurmctld.pid")
        for node in NODES:
            self.start_node(node)

    def start_node(self, node: str) -> None:
        """(Re)start the node's slurmd and wait until the node is idle."""
        pid_file = self.root / f"slurmd-{node}.pid"
        pid_file.unlink(missing_ok=True)
        self._daemon(f"slurmd-{node}", [*self.in_node(node), _sbin("slurmd"), "-N", node], pid_file)
        deadline = time.time() + 60
        while (state := self.run(["sinfo", "-h", "-n", node, "-o", "%T"], check=False).stdout.strip()) != "idle":
            if time.time() > deadline:
                raise RuntimeError(f"node {node} is '{state}', not idle, 60 s after its slurmd started\n{self.logs()}")
            time.sleep(0.5)

    def node_pids(self, node: str) -> list[int]:
        out = _ip("netns", "pids", self.netns[node]).stdout.split()
        return [int(pid) for pid in out if pid.isdigit() and pid != str(os.getpid())]

    def trainer_pids(self, node: str) -> list[int]:
        """The node's flip-train processes (python -m flip_scale.train; not the srun that started them)."""
        def is_rank(pid: int) -> bool:
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                return False
            return Path(args[0]).name.startswith("python") and "flip_scale.train" in args

        def parent(pid: int) -> int:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return 0
            return int(next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), 0))

        # A rank's own children share its command line (a loader worker, a fork about to exec):
        # only the processes whose parent is not a rank are ranks.
        ranks = [pid for pid in self.node_pids(node) if is_rank(pid)]
        return [pid for pid in ranks if parent(pid) not in ranks]

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL every process of the node (its slurmd, step daemons and ranks) at once."""
        pids = self.node_pids(node)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pids.pop(f"slurmd-{node}", None)
        return pids

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return super().run([*self.in_node(NODES[0]), *cmd], check=check, **kwargs)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in NODES), "munged.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def ctld_log(self) -> str:
        path = self.root / "log" / "slurmctld.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Cancel every job, stop the daemons, SIGKILL what is left in the namespaces, delete them."""
        if "slurmctld" in self.pids:
            try:
                self.run(["scancel", "--full", "--partition=twonode"], check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for name in [n for n in self.pids if n.startswith("slurmd-")] + ["slurmctld", "munged"]:
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 10
            while time.time() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        for ns in self.made_netns:
            for pid in re.findall(r"\d+", _ip("netns", "pids", ns).stdout):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in self.made_netns:
            _ip("netns", "del", ns)  # takes the veth pair with it
        self.made_netns.clear()
        for node in NODES:  # a veth end still on the host (a start that failed half-way)
            for suffix in ("v", "d"):
                if Path(f"/sys/class/net/{self.netns[node]}{suffix}").exists():
                    _ip("link", "del", f"{self.netns[node]}{suffix}")
