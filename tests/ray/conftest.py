"""A real Ray cluster on this machine for the `--executor ray` tests, and the release helpers.

`ray_cluster` (session): a head (`--num-cpus=0`: it takes no task) and two workers (`--num-cpus=1`
each, so two tiers go to two workers), each one `ray start --block` in its own process group, with
its own --temp-dir under a short /tmp folder (Ray's socket paths must stay under 107 characters),
free ports, no dashboard, no usage stats, token authentication off, and this test session's
isolated environment (tests/conftest.py). Ray turns --node-ip-address=127.0.0.1 into this host's
address (it wants a "remotely reachable" one: `ray._private.services.resolve_ip_for_localhost`),
so the nodes register under that address; the drivers reach the head at 127.0.0.1. Teardown:
SIGTERM then SIGKILL to every group; then no process of the cluster (Ray's workers, which sit in
groups of their own, included) may be left. The start and stop times show in the session summary;
the nodes' logs are kept when a test failed.

Fault tests change the cluster (`kill_node`, `limit_fsize`, `occupied`); `ensure_workers(2)` puts
it back. `pytest_collection_modifyitems` runs them last, the kill at the very end.

`local_release` (session): the demo release (tests/test_release.py's kind of config: Compact and
I-Compact, imatrix and eval on) by the local executor, the reference every Ray release is compared
with byte for byte. `release(...)` runs the real CLI as a driver process. The test modules reach
these helpers through the `raykit` fixture (`from conftest import` would be ambiguous).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from apex_orch.demo import synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "reliability"))   # relkit: the fault helpers

import relkit  # noqa: E402

RAY = Path(sys.executable).with_name("ray")
NAME = "Demo-Release"
TIERS = ("Compact", "I-Compact")
PHASES = ("fetch", "convert", "imatrix", "quantize", "eval", "card", "publish")
START_TIMEOUT = 120.0
TIMINGS: list[str] = []

# Ray settings of the test cluster: no drain on SIGTERM (30 s by default); a dead node noticed within
# ~3 s instead of ~30 s, so a killed worker's task is retried quickly; token authentication off
# whatever ~/.ray holds (Ray turns it on by itself when a token file exists there).
NODE_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


def tier_file(tier: str) -> str:
    return f"{NAME}-APEX-{tier}.gguf"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_field(pid: int, index: int) -> int | None:
    """A numeric field of /proc/PID/stat after the command name (0: state is not numeric)."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(rest[index])
    except (OSError, IndexError, ValueError):
        return None


def ppid_of(pid: int) -> int | None:
    return _proc_field(pid, 1)


def pgid_of(pid: int) -> int | None:
    return _proc_field(pid, 2)


def all_pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp: Path
    log: Path
    fsize: int | None = None

    @property
    def pgid(self) -> int:
        return self.proc.pid


@dataclass
class RayCluster:
    """A head and workers started by `ray start --block` (see the module docstring)."""
    root: Path
    env: dict[str, str]
    gcs_port: int = 0
    client_port: int = 0
    nodes: list[Node] = field(default_factory=list)
    started_at: float = 0.0
    _count: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if n.name != "head" and n.proc.poll() is None]

    def _start(self, name: str, args: list[str]) -> Node:
        temp = self.root / name
        temp.mkdir()
        ports = free_ports(6)
        argv = [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                "--disable-usage-stats", f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                f"--metrics-export-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
                f"--dashboard-agent-grpc-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
                "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=80000000", *args]
        log = self.root / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.root, start_new_session=True)
        node = Node(name, proc, temp, log)
        self.nodes.append(node)
        return node

    def start_head(self) -> Node:
        self.gcs_port, self.client_port = free_ports(2)
        return self._start("head", ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={self.client_port}",
                                    "--include-dashboard=false", "--num-cpus=0"])

    def add_worker(self) -> Node:
        """A worker node with one CPU."""
        self._count += 1
        return self._start(f"w{self._count}", [f"--address={self.address}", "--num-cpus=1"])

    def alive_worker_ids(self) -> list[str]:
        """Node ids of the alive nodes that offer CPUs, asked from a short-lived driver."""
        probe = ("import json, logging, ray\n"
                 f"ray.init(address={self.address!r}, logging_level=logging.ERROR, log_to_driver=False)\n"
                 "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]))\n")
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=self.env, timeout=60)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    def wait_workers(self, n: int, timeout: float = START_TIMEOUT) -> list[str]:
        """Wait until exactly n worker nodes are alive; their node ids."""
        deadline = time.monotonic() + timeout
        ids: list[str] = []
        while time.monotonic() < deadline:
            dead = [x.name for x in self.nodes if x.proc.poll() is not None and x in self.workers]
            assert not dead, f"ray nodes exited: {dead}\n" + self.logs()
            ids = self.alive_worker_ids()
            if len(ids) == n:
                return ids
            time.sleep(0.5)
        pytest.fail(f"the Ray cluster has {len(ids)} alive worker node(s), not {n}, after {timeout:.0f} s\n"
                    + self.logs(), pytrace=False)

    def ensure_workers(self, n: int = 2) -> None:
        """Back to n healthy workers (after a test killed or limited one)."""
        for node in [w for w in self.workers if w.fsize]:
            self.limit_fsize(node, None)
        while len(self.workers) < n:
            self.add_worker()
        self.wait_workers(n)

    def node_id(self, node: Node) -> str:
        """The Ray node id of a node started here (from the raylet's command line)."""
        for pid in self.pids_of(node):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for arg in cmd:
                if arg.startswith(b"--node_id="):
                    return arg.split(b"=", 1)[1].decode()
        raise AssertionError(f"no raylet found for ray node {node.name}")

    def pids_of(self, node: Node) -> list[int]:
        """The node's processes: its group (ray start, raylet, GCS, agents) and every descendant
        (Ray puts each worker process in a group of its own, and tools in sessions of their own)."""
        parents = {p: ppid_of(p) for p in all_pids()}
        found = {p for p in parents if pgid_of(p) == node.pgid}
        grew = True
        while grew:
            more = {p for p, pp in parents.items() if pp in found and p not in found}
            found |= more
            grew = bool(more)
        return sorted(p for p in found if not relkit.process_gone(p))

    def node_of(self, pid: int) -> Node | None:
        """The node whose process group holds pid or one of its ancestors (a Ray worker runs the
        task; the task's tool runs in its own session, a child of that worker)."""
        groups = {n.pgid: n for n in self.nodes}
        while pid and pid > 1:
            g = pgid_of(pid)
            if g in groups:
                return groups[g]
            pid = ppid_of(pid) or 0
        return None

    def limit_fsize(self, node: Node, size: int | None) -> None:
        """Cap the size of any file every process of the node writes (RLIMIT_FSIZE, as `prlimit --fsize`),
        the raylet included, so the workers it starts later inherit it; None lifts the cap. (Set on the
        running node: at its start the raylet maps its object store, a file larger than the cap.)"""
        # the soft limit only (the kernel's SIGXFSZ follows it): lifting it again needs no privilege
        value = resource.RLIM_INFINITY if size is None else size
        for _ in range(2):   # again, for a worker forked while the first pass ran
            for pid in self.pids_of(node):
                try:
                    resource.prlimit(pid, resource.RLIMIT_FSIZE, (value, resource.RLIM_INFINITY))
                except ProcessLookupError:
                    pass
        node.fsize = size

    @contextlib.contextmanager
    def occupied(self, node: Node):
        """Keep the node's one CPU taken (an actor of another driver, pinned to it) while in the block."""
        script = ("import logging, sys, ray\n"
                  "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Pin\n"
                  f"ray.init(address={self.address!r}, logging_level=logging.ERROR, log_to_driver=False)\n"
                  "@ray.remote(num_cpus=1)\n"
                  "class Busy:\n"
                  "    def ready(self):\n"
                  "        return ray.get_runtime_context().get_node_id()\n"
                  f"b = Busy.options(scheduling_strategy=Pin({self.node_id(node)!r}, soft=False)).remote()\n"
                  "print(ray.get(b.ready.remote(), timeout=60), flush=True)\n"
                  "sys.stdin.read()\n")
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True)
        watchdog = threading.Timer(90, lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
        watchdog.start()
        try:
            line = proc.stdout.readline().strip()
            assert line == self.node_id(node), f"the blocking actor did not start on {node.name}: {line!r} " \
                                               f"{proc.stderr.read() if proc.poll() is not None else ''}"
            yield
        finally:
            watchdog.cancel()
            proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def kill_node(self, node: Node) -> list[int]:
        """SIGKILL every process of the node at once (a machine that dies): its group, its Ray workers,
        the tools they run; the pids killed."""
        pids = self.pids_of(node)
        os.killpg(node.pgid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait()
        return pids

    def stop(self) -> None:
        for node in self.nodes:
            try:
                os.killpg(node.pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 8.0
        for node in self.nodes:
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.proc.wait()

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster still running: in a node's process group, or naming its temp dir."""
        groups = {n.pgid for n in self.nodes}
        return sorted({p for p in all_pids() if pgid_of(p) in groups and not relkit.process_gone(p)}
                      | set(relkit.pids_running(str(self.root))))

    def logs(self, lines: int = 15) -> str:
        out = []
        for node in self.nodes:
            text = node.log.read_text(errors="replace").splitlines() if node.log.exists() else []
            out.append(f"--- {node.name} ({node.log}):\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def ray_logs(self, pattern: str = "*", lines: int = 30) -> str:
        """The tails of the nodes' own Ray log files matching pattern (for failure messages)."""
        out = []
        for node in self.nodes:
            for f in sorted(node.temp.glob(f"session_latest/logs/{pattern}")):
                if f.is_file() and f.stat().st_size:
                    text = f.read_text(errors="replace").splitlines()[-lines:]
                    out.append(f"--- {node.name}: {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def driver_env(self, executor: str = "ray", **extra: str) -> dict[str, str]:
        env = dict(os.environ, RAY_AUTH_MODE="disabled", **extra)
        env.pop("RAY_ADDRESS", None)
        if executor == "ray":
            env["RAY_ADDRESS"] = self.address
        return env


@pytest.fixture(scope="session")
def _ray_nodes(request: pytest.FixtureRequest) -> RayCluster:
    """The cluster's processes, started and not yet waited for (they come up while the local
    reference release runs); stopped, and checked gone, after the last test of this folder."""
    root = Path(tempfile.mkdtemp(prefix="ar", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(NODE_ENV)
    cluster = RayCluster(root, env)
    cluster.started_at = time.monotonic()
    _LIVE.append(cluster)
    try:
        cluster.start_head()
        cluster.add_worker()
        cluster.add_worker()
        yield cluster
    finally:
        if cluster in _LIVE:
            _LIVE.remove(cluster)
            shut_down(cluster, keep_logs=bool(request.session.testsfailed))


_LIVE: list[RayCluster] = []


def shut_down(cluster: RayCluster, keep_logs: bool) -> None:
    """Stop the cluster; fail if any of its processes is left (Ray workers and the tools they ran included)."""
    t1 = time.monotonic()
    seen = {p for n in cluster.nodes for p in cluster.pids_of(n)}

    def left() -> list[int]:
        return sorted(set(cluster.leftover_pids()) | {p for p in seen if not relkit.process_gone(p)})
    cluster.stop()
    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    TIMINGS.append(f"ray cluster stopped in {time.monotonic() - t1:.1f} s")
    assert not left(), f"processes of the test's Ray cluster are still running: {left()}"
    if keep_logs:
        TIMINGS.append(f"the Ray nodes' logs are kept in {cluster.root}")
    else:
        shutil.rmtree(cluster.root, ignore_errors=True)


def _here(item: pytest.Item | None) -> bool:
    return item is not None and Path(str(item.path)).parent == Path(__file__).parent


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The cluster stops after the last test of this folder, not at the end of a whole-suite run."""
    if _LIVE and _here(item) and not _here(nextitem):
        shut_down(_LIVE.pop(), keep_logs=bool(item.session.testsfailed))


@pytest.fixture(scope="session")
def ray_cluster(_ray_nodes: RayCluster) -> RayCluster:
    """The cluster with its two workers alive."""
    _ray_nodes.wait_workers(2)
    TIMINGS.append(f"ray cluster (head + 2 workers) up {time.monotonic() - _ray_nodes.started_at:.1f} s after "
                   "its start (it starts while the local reference release runs)")
    return _ray_nodes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """This folder's tests together (one cluster's lifetime), the ones that change the cluster last,
    the one that kills a worker at the very end: then no replacement worker has to be started."""
    ours = [i for i in items if _here(i)]
    if not ours:
        return
    at = items.index(ours[0])
    ours.sort(key=lambda i: 2 if "killed" in i.name else 1 if i.path.name == "test_ray_faults.py" else 0)
    rest = [i for i in items if not _here(i)]
    items[:] = rest[:at] + ours + rest[at:]


def pytest_terminal_summary(terminalreporter) -> None:
    for line in TIMINGS:
        terminalreporter.write_line(line)


# ----------------------------------------------------------------------------- releases

def write_release(folder: Path, text: Path) -> Path:
    """tests/test_release.py's kind of config: two tiers (one needs the imatrix), eval on."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.yaml").write_text(
        "description: Synthetic prose for the release tests\nseed: 1\n"
        f"sources:\n  - path: {text}\n    split: paragraph\n")
    doc = {"name": NAME, "base_model": "apex-orch/APEX-Demo-MoE", "license": "mit",
           "source": {"demo": True}, "tiers": ["compact", "i-compact"],
           "imatrix": {"corpus": "corpus.yaml", "ctx": 128, "chunks": 4},
           "eval": {"text": str(text), "ctx": 128, "chunks": 2},
           "publish": {"repo": "apex-test/Demo-Release-APEX-GGUF"}}
    path = folder / "release.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def release_argv(cfg: Path, out: Path, *extra: str) -> list[str]:
    return relkit.cli_cmd("release", cfg, "--out-dir", out, *extra)


def release(cfg: Path, out: Path, *extra: str, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a real driver process; .stdout holds the summary, .stderr the progress."""
    return subprocess.run(release_argv(cfg, out, *extra), capture_output=True, text=True,
                          env=env if env is not None else dict(os.environ), timeout=timeout)


def last_run(out: Path) -> dict:
    return json.loads((out / ".apex-release" / "last-run.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published(out: Path) -> dict[str, str]:
    """relative name -> sha256 of what a release publishes: the GGUFs, the card, the LocalAI entries."""
    return {p.relative_to(out).as_posix(): sha256(p) for p in sorted(out.rglob("*"))
            if p.is_file() and not p.relative_to(out).as_posix().startswith(".apex-release")
            and not p.name.endswith((".manifest.json", ".log", ".tensor-types.txt"))}


def partials(out: Path) -> list[str]:
    """Every temporary (partial) file anywhere under the release folder."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if ".partial" in p.name)


@pytest.fixture(scope="session")
def demo_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray-text") / "eval.txt"
    path.write_text(synthetic.demo_text(20000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def local_release(_ray_nodes: RayCluster, tmp_path_factory: pytest.TempPathFactory, demo_text: Path) -> Path:
    """The demo release by the local executor (the reference); its release folder. (It asks for the
    cluster's processes first so that they start meanwhile.)"""
    folder = tmp_path_factory.mktemp("local-release")
    cfg = write_release(folder, demo_text)
    out = folder / "out"
    t0 = time.monotonic()
    r = release(cfg, out)
    TIMINGS.append(f"local demo release in {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(published(out)) == [tier_file(t) for t in TIERS] + [
        "README.md", "calibration/calibration.json", "calibration/calibration.txt", "calibration/imatrix.gguf",
        "kld-vs-size.png", "localai/demo-release-apex-compact.yaml", "localai/demo-release-apex-i-compact.yaml"]
    return out


def phase_table(stdout: str) -> dict[str, list[str]]:
    """The summary's phase table: phase -> [status, seconds, detail]."""
    rows = {}
    for line in stdout.split("\n\n")[0].splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in PHASES and len(cells) >= 3:
            rows[cells[0]] = cells[1:]
    return rows


def task_table(stdout: str) -> list[list[str]]:
    """The summary's task table: [task, file, worker, seconds, attempts] per row."""
    blocks = stdout.split("\n\n")
    assert len(blocks) >= 2, f"no task table in the summary:\n{stdout}"
    return [re.split(r"\s{2,}", line.strip()) for line in blocks[1].splitlines()
            if line.split(" ", 1)[0] in ("imatrix", "quantize", "eval-base", "eval")]


_THIS_MODULE = sys.modules[__name__]   # captured now: other folders' conftest modules share the name


@pytest.fixture(scope="session")
def raykit():
    """This module's helpers for the test modules (`from conftest import` would be ambiguous)."""
    return _THIS_MODULE
