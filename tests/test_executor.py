"""Where a release's heavy work runs: `--executor local|ray|ray://HOST:PORT`.

No cluster is needed here: the executor spec and its errors, Ray missing (the message says what
to install), a cluster that does not answer, errors crossing a process boundary (pickling), the
`resources:` config section, the settings workers are given, the local executor's task records on
a real one-tier release, and one in-process Ray instance (one CPU) for the Ray executor's own
paths: a result with its worker, an apex-orch error raised as itself naming the tier, and a task
whose worker dies on every attempt (retried, then one ExecutorError, its partials removed). The
multi-node cluster tests (kills, a full disk, byte-identical releases) are in tests/ray/.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from apex_orch.cli import main
from apex_orch.core import errors, settings
from apex_orch.core.errors import ApexError, ConfigError, ExecutorError, RequestError, ToolNotFoundError
from apex_orch.core.outputs import check_free_space
from apex_orch.llama.tools import configured_bin_dir, llama_bin_dir_option
from apex_orch.release import runner as rel
from apex_orch.release.config import ResourcesConfig
from apex_orch.release.config_reader import load_release
from apex_orch.release.executor import LocalExecutor, make_executor, parse_executor


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------- the spec

@pytest.mark.parametrize("spec, expected", [
    ("local", ("local", None)),
    ("ray", ("ray", None)),
    (" ray ", ("ray", None)),
    ("ray://head:10001", ("ray", "ray://head:10001")),
    ("ray://10.0.0.5:1", ("ray", "ray://10.0.0.5:1")),
    ("ray://[::1]:10001", ("ray", "ray://[::1]:10001")),
])
def test_parse_executor(spec, expected):
    assert parse_executor(spec) == expected


@pytest.mark.parametrize("spec", ["", "dask", "Local", "ray://", "ray://head", "ray://head:", "ray://:10001",
                                  "ray://head:0", "ray://head:65536", "ray://head:port", "ray:head:10001",
                                  "http://head:10001"])
def test_bad_executor_specs_are_usage_errors(spec):
    with pytest.raises(RequestError) as info:
        parse_executor(spec)
    assert info.value.message == f"{spec!r}: expected local, ray or ray://HOST:PORT"
    assert info.value.fields == ("executor",) and info.value.exit_code == 2


def test_bad_spec_through_the_cli_is_refused_before_anything(tmp_path):
    r = invoke("release", tmp_path / "missing.yaml", "--executor", "ray://head")
    assert r.exit_code == 2
    assert r.output == "error: --executor: 'ray://head': expected local, ray or ray://HOST:PORT\n"
    assert list(tmp_path.iterdir()) == []


def test_executor_option_in_help():
    r = invoke("release", "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "--executor TEXT Where imatrix, quantize and eval run: `local` (this machine), `ray` (the Ray " \
           "cluster RAY_ADDRESS names, else the one `ray start` started on this machine) or `ray://HOST:PORT` " \
           "(Ray Client)." in text
    assert "pip install 'apex-orch[ray]'" in text and "[default: local]" in text


# ----------------------------------------------------------------------------- Ray missing, cluster absent

def _hide_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now raises ImportError


def test_missing_ray_says_what_to_install(monkeypatch):
    _hide_ray(monkeypatch)
    with pytest.raises(ToolNotFoundError) as info:
        make_executor("ray://head:10001")
    assert "running on a Ray cluster needs Ray, which is not installed here" in info.value.message
    assert info.value.options == ("executor",)
    assert info.value.message.endswith("pip install 'apex-orch[ray]'")
    assert "ray[client]==2.60.0" in info.value.hint
    assert info.value.exit_code == 7


def test_missing_ray_through_the_cli_leaves_the_folder_unlocked(monkeypatch, tmp_path):
    _hide_ray(monkeypatch)
    cfg = tmp_path / "cfg" / "release.yaml"
    cfg.parent.mkdir()
    cfg.write_text("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: a/b}\n")
    out = tmp_path / "out"
    r = invoke("release", cfg, "--out-dir", out, "--executor", "ray")
    assert r.exit_code == 7
    assert r.output.startswith("error: running on a Ray cluster needs Ray, which is not installed here (")
    assert "pip install 'apex-orch[ray]'\nhint: the extra installs the pinned ray[client]==2.60.0" in r.output
    assert "docs/distributed.md) [--executor]\n" in r.output
    assert sorted(p.name for p in (out / ".apex-release").iterdir()) == ["release.log"]   # lock removed
    assert not list(out.glob("*.gguf"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # closed again when the block ends: nothing listens there


def test_a_cluster_that_does_not_answer_is_one_error(monkeypatch):
    import ray
    if ray.is_initialized():
        pytest.fail("a Ray instance is already running in this process")
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ExecutorError) as info:
        make_executor("ray")
    assert info.value.message.startswith(f"cannot reach the Ray cluster at 127.0.0.1:{port}: ConnectionRefusedError")
    assert info.value.exit_code == 18
    assert not ray.is_initialized() and signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- errors cross processes

def _all_errors() -> list[type]:
    found, todo = [], [ApexError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [c for c in found if c.__module__ == errors.__name__]


@pytest.mark.parametrize("cls", _all_errors(), ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_fields(cls):
    err = cls("the message", hint="the hint", where="file.yaml:3")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert (back.message, back.hint, back.where, back.exit_code) == ("the message", "the hint", "file.yaml:3",
                                                                     cls.exit_code)
    assert back.render() == err.render() and str(back) == str(err) and back.args == ("the message",)


def test_tool_and_gate_errors_keep_their_own_fields():
    err = errors.ToolTimeoutError("llama-quantize timed out", returncode=-9, log_path=Path("/x/out.log"),
                                  log_tail="line 1\nline 2", hint="raise --timeout")
    back = pickle.loads(pickle.dumps(err))
    assert (back.returncode, back.log_path, back.log_tail) == (-9, Path("/x/out.log"), "line 1\nline 2")
    assert back.render() == err.render() and back.exit_code == 8
    gate = errors.GateFailedError("2 gates failed")
    gate.table = "| tier | kld |"
    assert pickle.loads(pickle.dumps(gate)).table == "| tier | kld |"


# ----------------------------------------------------------------------------- what workers are given

def test_worker_environment_carries_the_settings_in_effect(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("APEX_ORCH_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.delenv("APEX_ORCH_EVAL_CACHE", raising=False)
    with llama_bin_dir_option(tmp_path / "bin"):
        env = settings.worker_environment(configured_bin_dir())
    assert env == {"APEX_ORCH_CACHE": str(settings.cache_root()), "APEX_ORCH_BUILD_ROOT": str(settings.build_root()),
                   "APEX_ORCH_EVAL_CACHE": str(settings.cache_root() / "eval"),
                   "APEX_LLAMA_BIN_DIR": str(tmp_path / "bin"), "APEX_ORCH_PROFILES": str(tmp_path / "profiles")}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APEX_ORCH_CACHE", "rel-cache")   # a worker's working folder differs: absolute
    assert settings.worker_environment()["APEX_ORCH_CACHE"] == str(tmp_path / "rel-cache")


# ----------------------------------------------------------------------------- the resources section

def _cfg(tmp_path: Path, extra: str) -> Path:
    p = tmp_path / "release.yaml"
    p.write_text("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: a/b}\n" + extra)
    return p


def test_resources_section(tmp_path):
    assert load_release(_cfg(tmp_path, "")).resources == ResourcesConfig()
    r = load_release(_cfg(tmp_path, "resources: {cpus: 8, gpus: 0.5, memory: 64G}\n")).resources
    assert (r.cpus, r.gpus, r.memory) == (8, 0.5, 64 * 1000 ** 3)


@pytest.mark.parametrize("text, message", [
    ("resources: {cpus: 0}", "resources.cpus: expected an integer >= 1, got 0"),
    ("resources: {gpus: -1}", "resources.gpus: expected a number >= 0, got -1"),
    ("resources: {memory: lots}", "resources.memory: 'lots' is not a size such as 48G, 48GB, 45GiB, 48e9 or 500M "
                                  "(K/M/G/T and KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024, a "
                                  "plain number is bytes)"),
    ("resources: {memory: 10K}", "resources.memory: 10K is too small: at least 1 MB"),
    ("resources: {memory: 1.5GiB}", None),
    ("resources: {disk: 1T}", "unknown key 'resources.disk'"),
])
def test_bad_resources_name_file_and_line(tmp_path, text, message):
    if message is None:   # binary units read too: 1.5 x 2^30 bytes
        assert load_release(_cfg(tmp_path, text + "\n")).resources.memory == 3 * 2 ** 29
        return
    with pytest.raises(ConfigError) as info:
        load_release(_cfg(tmp_path, text + "\n"))
    assert info.value.message == message and info.value.where.endswith("release.yaml:6")


# ----------------------------------------------------------------------------- the local executor

@pytest.mark.requires_tools("llama-quantize")
def test_local_release_records_one_task_per_file(tmp_path, eval_text):
    cfg = _cfg(tmp_path, f"eval: {{text: {eval_text}, ctx: 128, chunks: 2}}\n")
    result = rel.run_release(load_release(cfg), out_dir=tmp_path / "out", phases=["fetch", "convert", "imatrix",
                                                                                   "quantize", "eval"])
    assert isinstance(result.state.executor, LocalExecutor)
    worker = f"local ({socket.gethostname()})"
    tasks = [(t.phase, t.target, t.worker, t.attempts, t.status) for t in result.state.executor.records]
    assert tasks == [("quantize", "X-APEX-Compact.gguf", worker, 1, "done"),
                     ("eval-base", result.state.model_path.name, worker, 1, "done"),
                     ("eval", "X-APEX-Compact.gguf", worker, 1, "done")]
    summary = rel.format_reports(result).splitlines()
    header = next(i for i, line in enumerate(summary) if line.split() == ["task", "file", "worker", "seconds",
                                                                         "attempts"])
    assert [line.split()[:2] for line in summary[header + 2:header + 5]] == [
        ["quantize", "X-APEX-Compact.gguf"], ["eval-base", result.state.model_path.name],
        ["eval", "X-APEX-Compact.gguf"]]
    doc = json.loads((tmp_path / "out" / ".apex-release" / "last-run.json").read_text())
    assert doc["executor"] == "local"
    assert [(t["phase"], t["target"], t["worker"]) for t in doc["tasks"]] == [x[:3] for x in tasks]


# ----------------------------------------------------------------------------- the Ray executor, in process

@pytest.fixture(scope="module")
def ray_here(tmp_path_factory):
    """One Ray instance in this process (one CPU, its own temp folder), shut down afterwards."""
    import ray
    temp = Path(f"/tmp/apex-ray-{os.getpid()}")   # Ray's socket paths must stay short
    # Ray writes an auth token under ~/.ray when it starts a cluster, and then turns token auth on
    # for every later `ray start` of that user: keep this one's home and auth to the test.
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_AUTH_MODE")}
    os.environ.update(HOME=str(tmp_path_factory.mktemp("ray-home")), RAY_AUTH_MODE="disabled")
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=str(temp), log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_ray_tasks_results_errors_and_lost_workers(ray_here, tmp_path):
    from apex_orch.release import ray_executor as rx
    lines: list[str] = []
    ex = make_executor("ray", progress=lines.append)
    try:
        assert isinstance(ex, rx.RayExecutor) and not ex.owns_connection   # the test's instance: not closed
        # a result, with the worker that made it
        ok = ex._task("quantize", "A.gguf", (shutil.disk_usage, None, (str(tmp_path),), {}), 1 << 20)
        assert ex._run([ok], lines.append)[0].total > 0
        record = ex.records[-1]
        assert (record.phase, record.target, record.attempts, record.status) == ("quantize", "A.gguf", 1, "done")
        assert record.worker.endswith(f"({socket.gethostname()}, pid {record.worker.rsplit(' ', 1)[1]}")
        # an apex-orch error on the worker: not retried, raised as itself, naming the tier's file
        full = ex._task("quantize", "B.gguf", (check_free_space, None, (tmp_path, 10 ** 18), {}), 1 << 20)
        fine = ex._task("quantize", "C.gguf", (shutil.disk_usage, None, (str(tmp_path),), {}), 1 << 20)
        with pytest.raises(errors.DiskSpaceError) as info:
            ex._run([full, fine], lines.append)
        assert info.value.message.startswith(f"B.gguf: not enough free disk in {tmp_path}: ")
        assert [(r.target, r.attempts, r.status) for r in ex.records[-2:]] == [("B.gguf", 1, "failed"),
                                                                               ("C.gguf", 1, "done")]
        # a worker that dies on every attempt: retried twice, then its partials go and one error
        output = tmp_path / "D.gguf"
        partial = tmp_path / ".D.gguf.partial-999999"
        partial.write_bytes(b"half")
        dead = ex._task("quantize", "D.gguf", (os._exit, None, (1,), {}), 1 << 20, output=output)
        with pytest.raises(ExecutorError) as info:
            ex._run([dead], lines.append)
        assert info.value.message.startswith("D.gguf: the quantize task did not finish on the Ray cluster "
                                             f"({rx.MAX_RETRIES + 1} attempt(s), the last on ")
        assert info.value.exit_code == 18
        assert not partial.exists() and "removed a partial file left by a lost task: .D.gguf.partial-999999" in lines
        assert (ex.records[-1].attempts, ex.records[-1].status) == (rx.MAX_RETRIES + 1, "lost")
        assert sum(1 for line in lines if line.startswith("quantize D.gguf: on ")) == rx.MAX_RETRIES + 1
        # a task no node can hold is refused before it is submitted (Ray would wait for ever)
        huge = ex._task("quantize", "E.gguf", (shutil.disk_usage, None, (str(tmp_path),), {}), 1 << 60)
        with pytest.raises(ExecutorError, match=r"^E.gguf: the quantize task needs 1 CPU\(s\), 1073741824.0 GiB"):
            ex._run([huge], lines.append)
    finally:
        ex.close()
    assert ray_here.is_initialized()
