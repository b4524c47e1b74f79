"""Task accuracy through llama-perplexity's own scorers (apex_orch.evaluation.tasks).

The project writes its own task files in the three formats (tests/task_samples.py), the pinned
llama-perplexity scores them on a TRAINED model (the reference model's smoke build: 6 training
steps on Python code and its documentation), and every task's answer is checked against an
independent computation through the bindings (tests/task_reference.py: the tool's batches, its
normalisation, its task draws). The formats' readers, the pinned-data fetch (the real
huggingface_hub client against tests/hubserver.py) and the bad inputs need no trained model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import task_samples as S
from apex_orch.core.errors import TaskError
from apex_orch.evaluation import task_data, tasks
from apex_orch.evaluation.task_files import (ChoiceTask, HellaSwagTask, WinograndeTask, read_task_set,
                                             write_hellaswag, write_multiple_choice, write_winogrande)
from apex_orch.evaluation.tool_backend import run_tool_logged
from apex_orch.llama.tools import find_tool

REPO = Path(__file__).resolve().parents[1]
SETTINGS = tasks.TaskSettings(n_ctx=512, n_threads=2)     # -c 512: small logits buffers on 2 cores
WRITERS = {"hellaswag": (write_hellaswag, S.HELLASWAG, "hs.txt"),
           "winogrande": (write_winogrande, S.WINOGRANDE, "wg.csv"),
           "mmlu": (write_multiple_choice, S.CHOICES, "mmlu.bin")}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("task-files")
    for name, (write, samples, fname) in WRITERS.items():
        write(d / fname, samples)
    return d


@pytest.fixture(scope="module", autouse=True)
def eval_cache(tmp_path_factory: pytest.TempPathFactory):
    """Task results are cached under the eval cache: a fresh folder for this module."""
    folder = tmp_path_factory.mktemp("eval-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APEX_ORCH_EVAL_CACHE", str(folder))
        yield folder


# --------------------------------------------------------------------------- formats (no model)

def test_written_files_read_back_as_the_tool_reads_them(task_dir: Path) -> None:
    for name, (_, samples, fname) in WRITERS.items():
        ts = read_task_set(name, task_dir / fname)
        assert list(ts.tasks) == samples
        assert (ts.file.n_tasks, ts.file.notes) == (12, ())
        assert ts.file.max_answers == {"hellaswag": 4, "winogrande": 2, "mmlu": 6}[name]
        assert len(ts.file.sha256) == 64 and ts.file.n_bytes == (task_dir / fname).stat().st_size
    # the MC format, byte for byte: count, offsets, then question / mc1 / mc2 per task
    raw = (task_dir / "mmlu.bin").read_bytes()
    assert int.from_bytes(raw[:4], "little") == 12 and int.from_bytes(raw[4:8], "little") == 4 + 4 * 12
    # a sentence holding commas is quoted, and the quotes are not part of the task
    t = WinograndeTask("If a, then _ wins.", ("x", "y"), 2)
    write_winogrande(task_dir / "comma.csv", [t])
    assert "0,\"If a, then _ wins.\",x,y,2\n" in (task_dir / "comma.csv").read_text()
    assert read_task_set("winogrande", task_dir / "comma.csv").tasks == (t,)


def test_winogrande_last_row_without_a_newline_after_f_is_not_read(tmp_path: Path) -> None:
    """`-f` drops the file's final newline, and the tool's CSV loop stops at a row no newline
    follows: a file ending in one newline loses its last row (the published one does)."""
    rows = "index,sentence,option1,option2,answer\n0,A _ b.,x,y,1\n1,C _ d.,x,y,2\n"
    (tmp_path / "wg.csv").write_text(rows)
    ts = read_task_set("winogrande", tmp_path / "wg.csv")
    assert ts.file.n_tasks == 1 and ts.tasks[0].sentence == "A _ b."
    assert ts.file.notes and "line 3 is not scored" in ts.file.notes[0]
    (tmp_path / "wg.csv").write_text(rows + "\n")
    assert read_task_set("winogrande", tmp_path / "wg.csv").file.n_tasks == 2


MC_OK = [ChoiceTask("Q one?", ("a", "b"), 1), ChoiceTask("Q two?", ("c", "d", "e"), 0)]


def _mc_bytes(tmp: Path, tasks_=MC_OK) -> bytes:
    write_multiple_choice(tmp / "ok.bin", tasks_)
    return (tmp / "ok.bin").read_bytes()


# (task, file content, where (relative to the file), message)
BAD = [
    ("hellaswag", b"ctx\n0\na\nb\nc\n", "", "5 lines is not a multiple of 6 (a task is its context, the gold ending's "
                                            "index and 4 endings): the task from line 1 is incomplete"),
    ("hellaswag", b"ctx\n0\na\nb\nc\nd\nctx2\n7\na\nb\nc\nd\n", ":8",
     "task 2: the gold ending's index is '7', not 0, 1, 2 or 3"),
    ("hellaswag", b"ctx\n0\na\n \nc\nd\n", ":4", "task 1: empty ending 1"),
    ("hellaswag", b"ctx\r\n0\na\nb\nc\nd\n", ":1", "task 1: carriage return in the line"),
    ("winogrande", b"index,sentence,option1,option2,answer\n0,A _ b.,x,y,1\n1,no blank,x,y\n\n", ":3",
     "expected 5 comma-separated fields"),
    ("winogrande", b"0,A _ b.,x,y,1\n1,C _ d.,x,y,3\n\n", ":2", "the answer is '3', not 1 or 2"),
    ("winogrande", b"0,A _ b.,x,y,1\n1,no blank here,x,y,1\n\n", ":2", "the sentence has no '_' where an option goes"),
    ("winogrande", b"index,sentence,option1,option2,answer\n", "", "no tasks"),
]


@pytest.mark.parametrize("task, data, where, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_malformed_text_files_name_the_line(tmp_path: Path, task: str, data: bytes, where: str, message: str) -> None:
    p = tmp_path / "bad"
    p.write_bytes(data)
    with pytest.raises(TaskError) as err:
        read_task_set(task, p)
    assert err.value.where == f"{p}{where}"
    assert err.value.message.startswith(message), err.value.message
    assert err.value.exit_code == 21


def test_malformed_multiple_choice_files_name_the_task(tmp_path: Path) -> None:
    good = _mc_bytes(tmp_path)
    # task 2 ends with its mc1 labels (3 x int32) and an empty mc2 (count 0): labels 1, 1, 0
    two_right = good[:-16] + b"".join(v.to_bytes(4, "little") for v in (1, 1, 0)) + good[-4:]
    cases = [
        (good[:-3], "task 2 mc2 count: the file ends at byte"),
        (good + b"\0", "1 bytes follow the last task"),
        (good[:4] + (99).to_bytes(4, "little") + good[8:], "task 1: the offset table says byte 99, but the task "
                                                           "starts at byte 12"),
        ((0).to_bytes(4, "little"), "no tasks: the task count is 0"),
        ((5000).to_bytes(4, "little") + good[4:], "the task count is 5,000, but the file"),
        (two_right, "task 2: 2 answers are labelled correct; mc1 needs exactly one"),
    ]
    for data, message in cases:
        p = tmp_path / "bad.bin"
        p.write_bytes(data)
        with pytest.raises(TaskError) as err:
            read_task_set("mmlu", p)
        assert err.value.where == str(p) and err.value.message.startswith(message), err.value.message


def test_results_round_trip_through_json() -> None:
    from apex_orch.evaluation.inputs import ModelFacts
    from apex_orch.evaluation.results import EvalResult, SpeedResult, TaskResult
    t = TaskResult(task="hellaswag", title="HellaSwag", scorer="hellaswag", accuracy=62.5, n_tasks=400,
                   n_available=10042, data="hs.txt", data_sha256="a" * 64, settings={"n_ctx": 4096}, ci95=(57.6, 67.1),
                   outcomes="10" * 200)
    sp = SpeedResult(512, 100.0, 128, 10.0, 2, 2048, 512, True, 5, 1.5, 0.2, False, "llama-bench", "0c1e570")
    r = EvalResult(model=ModelFacts("m.gguf", "", 1, 1, 16.0, "F16", "mistral4", "m"), backend="llama-perplexity",
                   settings={}, text=None, n_tokens=None, n_chunks=0, n_scored=0, ppl=None, ppl_err=None,
                   tasks=[t], speed=sp)
    assert EvalResult.from_dict(json.loads(r.to_json())) == r
    assert t.describe() == "62.50 [57.60, 67.10]" and replace(t, error=2.42).describe() == "62.50 ± 2.42"
    assert "pp512 100.0 ± 1.5 t/s, tg128 10.0 ± 0.2 t/s (llama-bench" in sp.describe()


def test_task_specs() -> None:
    specs = tasks.parse_task_specs("hellaswag=a.txt,winogrande=b.csv,mmlu", {"winogrande": 0})
    assert specs == [tasks.TaskSpec("hellaswag", "a.txt"), tasks.TaskSpec("winogrande", "b.csv", 0),
                     tasks.TaskSpec("mmlu")]
    for bad, message in [("hellaswagg=a", "unknown task 'hellaswagg'"), ("mmlu,mmlu", "mmlu is given twice"),
                         ("mmlu=", "mmlu= names no file"), ("mmlu,,arc-easy", "empty entry")]:
        with pytest.raises(TaskError, match=re.escape(message)):
            tasks.parse_task_specs(bad)


# --------------------------------------------------------------------------- pinned data (fake Hub)

@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    from hubserver import running_hub
    with running_hub(monkeypatch) as server:
        yield server


def test_pinned_data_is_fetched_once_through_the_hub(hub, task_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = (task_dir / "mmlu.bin").read_bytes()
    sha = read_task_set("mmlu", task_dir / "mmlu.bin").file.sha256
    repo = task_data.SOURCES["mmlu"].repo
    commit = hub.add_file(repo, "mmlu-validation.bin", data)
    monkeypatch.setitem(task_data.SOURCES, "mmlu", task_data.TaskSource(repo, "mmlu-validation.bin", commit, sha, "test"))
    hub.requests.clear()
    path, source = task_data.fetch("mmlu")
    assert [r.op for r in hub.requests] == ["resolve", "resolve"]        # HEAD, GET: the real client downloaded it
    assert path == task_data.tasks_cache_dir() / sha / "mmlu-validation.bin"
    assert path.read_bytes() == data and source.label == f"hf:{repo}@{commit[:12]}/mmlu-validation.bin"
    hub.requests.clear()
    assert task_data.fetch("mmlu")[0] == path and hub.requests == []     # the cache: no request at all
    pin = task_data.pin_source("mmlu")                      # what a maintainer runs to fill SOURCES
    assert (pin.repo, pin.filename, pin.revision, pin.sha256) == (repo, "mmlu-validation.bin", commit, sha)
    # a pin the Hub's bytes do not match: refused, nothing cached
    monkeypatch.setitem(task_data.SOURCES, "arc-easy", replace(pin, filename="mmlu-validation.bin", sha256="0" * 64))
    with pytest.raises(TaskError, match="the downloaded file's sha256 is .*, the pin says 0000"):
        task_data.fetch("arc-easy")
    assert not (task_data.tasks_cache_dir() / ("0" * 64)).exists()
    # an unpinned row and HellaSwag (no Hub source) say what to do
    with pytest.raises(TaskError, match="is not pinned yet"):
        task_data.fetch("truthfulqa")
    with pytest.raises(TaskError, match=r"HellaSwag data has no pinned Hub source: give the file \(hellaswag=PATH\)"):
        task_data.fetch("hellaswag")


# --------------------------------------------------------------------------- bad inputs (CLI)

def _cli(*args: object, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apex_orch.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO), **env))


def test_bad_task_inputs_are_one_message_each(mistral4_split: Path, tmp_path: Path) -> None:
    hs = tmp_path / "hs.txt"
    hs.write_text("ctx\n9\na\nb\nc\nd\n")
    wg = tmp_path / "wg.csv"
    wg.write_text("0,no blank,x,y,1\n\n")
    mc = tmp_path / "mc.bin"
    mc.write_bytes(_mc_bytes(tmp_path)[:-2])
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    cases = [
        (f"hellaswag={hs}", 21, f"error: {hs}:2: task 1: the gold ending's index is '9', not 0, 1, 2 or 3"),
        (f"winogrande={wg}", 21, f"error: {wg}:1: the sentence has no '_' where an option goes"),
        (f"mmlu={mc}", 21, f"error: {mc}: task 2 mc2 count: the file ends at byte"),
        ("hellaswag=x.txt,mmlux", 2, "Invalid value for '--tasks': unknown task 'mmlux' in 'hellaswag=x.txt,mmlux'"),
        (f"arc-easy={tmp_path / 'missing.bin'}", 21, f"error: {tmp_path / 'missing.bin'}: file not found"),
        (f"winogrande={fifo}", 21, f"error: {fifo}: is not a regular file (a FIFO / named pipe); apex-orch reads Winogrande task files from "
                                             "regular files only"),
    ]
    for spec, code, message in cases:
        r = _cli("eval", mistral4_split, "--tasks", spec)
        assert r.returncode == code, (spec, r.stderr)
        assert r.stderr.count("error:") + r.stderr.count("Error:") == 1, r.stderr
        assert message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
    from click.testing import CliRunner

    from apex_orch.cli import main
    for args, message in [(["--task-count", "mmlu=5"], "--task-count needs --tasks"),
                          (["--tasks", "mmlu", "--task-count", "mmlu=0"], "'mmlu=0': write NAME=N (N >= 1) or NAME=all"),
                          (["--tasks", f"mmlu={mc}", "--task-count", "hellaswag=5"],
                           "a count is given for hellaswag, which is not among the tasks")]:
        res = CliRunner().invoke(main, ["eval", str(mistral4_split), *args])
        assert res.exit_code == 2 and message in res.output, res.output


# --------------------------------------------------------------------------- on a trained model

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference model's smoke build (~5 s): trained, so its answers are not random noise."""
    pytest.importorskip("torch", reason="torch is not installed (the `bench`/`archs` extra); the trained "
                                        "reference model needs it")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.reference_model import train
    from bench.reference_model.config import SMOKE
    rec = train.build(SMOKE, out_dir=tmp_path_factory.mktemp("trained"), log=lambda _m: None,
                      run_perplexity_tool=False)
    return Path(rec["model"]["path"])


def _reference(model: Path, name: str, chosen_tasks: list, n_parallel: int):
    from task_reference import ReferenceScorer
    ref = ReferenceScorer(model, n_ctx=SETTINGS.n_ctx, n_parallel=n_parallel)
    try:
        return getattr(ref, {"hellaswag": "hellaswag", "winogrande": "winogrande", "mmlu": "multiple_choice"}[name])(
            chosen_tasks)
    finally:
        ref.close()


def _gold(name: str, task) -> int:
    return {"hellaswag": lambda t: t.gold, "winogrande": lambda t: t.answer - 1, "mmlu": lambda t: t.correct}[name](task)


CROSS = [("hellaswag", None), ("winogrande", None), ("winogrande", 7), ("mmlu", None), ("mmlu", 5)]


@pytest.mark.slow
@pytest.mark.requires_tools("llama-perplexity")
@pytest.mark.parametrize("name, count", CROSS, ids=[f"{n}-{c or 'all'}" for n, c in CROSS])
def test_every_answer_equals_an_independent_computation(trained: Path, task_dir: Path, tmp_path: Path,
                                                        name: str, count: int | None) -> None:
    from task_reference import hellaswag_order, subset_order
    write, samples, fname = WRITERS[name]
    spec = tasks.TaskSpec(name, str(task_dir / fname), count)
    [result] = tasks.evaluate_tasks(trained, [spec], SETTINGS)
    n = result.n_tasks
    assert (n, result.n_available) == (count or 12, 12)
    order = hellaswag_order(12, n) if name == "hellaswag" else subset_order(12, n)
    choices = _reference(trained, name, [samples[i] for i in order], result.settings["n_parallel"])
    # the tool's right/wrong per task, in its order, is ours
    assert result.outcomes == "".join("1" if c.chosen == _gold(name, samples[i]) else "0"
                                      for c, i in zip(choices, order))
    assert result.accuracy == pytest.approx(100.0 * result.outcomes.count("1") / n, abs=5e-5)
    # every task is decided by far more than float rounding (else the comparison could not fail)
    assert min(c.margin for c in choices) > 1e-5, [c.margin for c in choices]
    # and every chosen answer is the tool's: with the gold set to ours, the tool scores 100%
    mine = {i: c.chosen for c, i in zip(choices, order)}
    relabeled = [_with_gold(name, t, mine.get(i, _gold(name, t))) for i, t in enumerate(samples)]
    write(tmp_path / fname, relabeled)
    [again] = tasks.evaluate_tasks(trained, [replace(spec, path=str(tmp_path / fname))], SETTINGS)
    assert again.outcomes == "1" * n and again.accuracy == 100.0
    if name == "winogrande":     # the tool prints both candidates' scores: ours equal them to its 6 decimals
        argv = tasks.tool_argv(str(trained), str(task_dir / fname), "winogrande", n, 2, SETTINGS)
        lines = run_tool_logged(argv, "winogrande", tmp_path, tasks._complete("winogrande", n, 12))
        printed = [(float(m.group(3)), float(m.group(4))) for m in tasks._task_lines(lines, "winogrande")]
        assert len(printed) == n
        for (a, b), c in zip(printed, choices):
            assert abs(a - c.scores[0]) < 2e-6 and abs(b - c.scores[1]) < 2e-6, (a, b, c.scores)
        assert {c.skip for c in choices} == {True, False} or n < 12   # both of Winogrande's rules exercised


def _with_gold(name: str, task, gold: int):
    if name == "hellaswag":
        return replace(task, gold=gold)
    if name == "winogrande":
        return replace(task, answer=gold + 1)
    return replace(task, correct=gold)


def _tool_accuracy(model: Path, flag: str, path: Path, count_flag: str, n: int, np_: int, tmp: Path) -> float:
    """llama-perplexity run by hand (as the APEX pipeline runs it) and read the way that pipeline
    reads it: the last task line's accuracy, or multiple choice's "Final result"."""
    file_flag = "-bf" if flag == "--multiple-choice" else "-f"
    argv = [find_tool("llama-perplexity").path, "-m", model, file_flag, path, flag, count_flag, str(n), "-c", "512",
            "-np", str(np_), "-t", "2", "-fa", "on", "-nr"]
    final = "Final result" if flag == "--multiple-choice" else None
    lines = run_tool_logged([str(a) for a in argv], flag.strip("-"), tmp, lambda ls: any(
        (final in x) if final else x.startswith(f"{n}\t") for x in ls))
    if final:
        return float(re.search(r"Final result: (\S+)", next(x for x in lines if final in x)).group(1))
    return float(next(x for x in lines if x.startswith(f"{n}\t")).split("\t")[1].rstrip("%"))


@pytest.mark.slow
@pytest.mark.requires_tools("llama-perplexity")
def test_cli_eval_tasks_reports_the_accuracies_llama_perplexity_prints(trained: Path, task_dir: Path,
                                                                       tmp_path: Path) -> None:
    spec = f"hellaswag={task_dir / 'hs.txt'},winogrande={task_dir / 'wg.csv'},mmlu={task_dir / 'mmlu.bin'}"
    cache = {"APEX_ORCH_EVAL_CACHE": str(tmp_path / "cache")}      # nothing from the tests above
    r = _cli("eval", trained, "--tasks", spec, "--task-ctx", "512", "-t", "2", "--json", "-q", **cache)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["text"] is None and doc["ppl"] is None
    got = {t["task"]: t for t in doc["tasks"]}
    assert list(got) == ["hellaswag", "winogrande", "mmlu"]
    expected = {"hellaswag": _tool_accuracy(trained, "--hellaswag", task_dir / "hs.txt", "--hellaswag-tasks", 12, 4,
                                            tmp_path),
                "winogrande": _tool_accuracy(trained, "--winogrande", task_dir / "wg.csv", "--winogrande-tasks", 12,
                                             4, tmp_path),
                "mmlu": _tool_accuracy(trained, "--multiple-choice", task_dir / "mmlu.bin",
                                       "--multiple-choice-tasks", 12, 16, tmp_path)}
    assert {k: v["accuracy"] for k, v in got.items()} == expected
    assert [got[k]["n_tasks"] for k in got] == [12, 12, 12] and not any(t["cached"] for t in got.values())
    assert got["mmlu"]["error"] is not None and got["hellaswag"]["ci95"] is not None
    assert got["winogrande"]["error"] is None      # the tool prints none below 100 tasks
    # the same command again: every result from the cache, the same numbers; the text shows them
    again = _cli("eval", trained, "--tasks", spec, "--task-ctx", "512", "-t", "2", "-q", **cache)
    assert again.returncode == 0, again.stderr
    for k, v in expected.items():
        assert re.search(rf"{got[k]['title']}: +{re.escape(repr(v))}%.*cached\)", again.stdout), again.stdout


@pytest.mark.slow
@pytest.mark.requires_tools("llama-perplexity")
def test_pinned_data_scores_end_to_end(trained: Path, task_dir: Path, hub, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from apex_orch.cli import main
    commit = hub.add_file(task_data.SOURCES["arc-challenge"].repo, "arc-challenge-validation.bin",
                          (task_dir / "mmlu.bin").read_bytes())
    monkeypatch.setitem(task_data.SOURCES, "arc-challenge", task_data.pin_source("arc-challenge"))
    res = CliRunner().invoke(main, ["eval", str(trained), "--tasks", "arc-challenge", "--task-ctx", "512", "-t", "2",
                                    "--json", "-q"])
    assert res.exit_code == 0, res.output
    [t] = json.loads(res.stdout)["tasks"]
    assert t["data"] == f"hf:{task_data.SOURCES['arc-challenge'].repo}@{commit[:12]}/arc-challenge-validation.bin"
    assert t["n_tasks"] == 12 and t["title"] == "ARC-Challenge"


@pytest.mark.slow
@pytest.mark.requires_tools("llama-perplexity", "llama-quantize", "llama-bench")
def test_compare_has_a_column_per_task_set_and_llama_bench_speed(trained: Path, task_dir: Path, eval_text: Path,
                                                                 tmp_path: Path) -> None:
    from click.testing import CliRunner

    from apex_orch.cli import main
    from apex_orch.evaluation import compare as evalreport
    from apex_orch.evaluation.inputs import EvalSettings
    from apex_orch.llama.tools import run_tool
    q8 = tmp_path / "reference-Q8_0.gguf"
    run_tool([find_tool("llama-quantize").path, trained, q8, "Q8_0", "2"])
    specs = tasks.parse_task_specs(f"hellaswag={task_dir / 'hs.txt'},mmlu={task_dir / 'mmlu.bin'}")
    report = evalreport.compare([q8], trained, text=eval_text, settings=EvalSettings(n_ctx=64, chunks=4, n_threads=2),
                                tasks=specs, task_settings=SETTINGS, speed=True, speed_repetitions=2)
    base_row, row = report.rows()
    assert list(base_row.tasks) == list(row.tasks) == ["hellaswag", "mmlu"]
    for r, results in ((base_row, report.base_tasks), (row, report.results[0].tasks)):
        assert [r.tasks[t.task]["accuracy"] for t in results] == [t.accuracy for t in results]
        assert r.pp_tokens_per_s_sd is not None and r.tg_tokens_per_s_sd is not None
    assert report.base_speed.tool == report.results[0].speed.tool == "llama-bench"
    md = evalreport.format_report(report, "md")
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header[-4:] == ["HellaSwag", "MMLU", "pp512 t/s", "tg128 t/s"]
    assert "llama-bench pp512/tg128 t/s, mean ± sd of 2 repetition(s), threads 2" in md
    assert "tasks: llama-perplexity's scorers" in md and "HellaSwag 12 of 12" in md
    hs = report.base_tasks[0]
    assert f"{hs.accuracy:.2f} [{hs.ci95[0]:.2f}, {hs.ci95[1]:.2f}]" in md.splitlines()[2]
    csv_header = evalreport.format_report(report, "csv").splitlines()[0].split(",")
    assert csv_header[-5:] == ["hellaswag_accuracy", "hellaswag_error", "mmlu_accuracy", "mmlu_error", "gate_failures"]
    # the command line: the same columns, the task results from the cache
    res = CliRunner().invoke(main, ["compare", str(q8), "--base", str(trained), "--text", str(eval_text), "-c", "64",
                                    "--chunks", "4", "-t", "2", "--tasks", f"hellaswag={task_dir / 'hs.txt'}",
                                    "--tasks", f"mmlu={task_dir / 'mmlu.bin'}", "--task-ctx", "512",
                                    "--no-speed", "--format", "json", "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [t["accuracy"] for t in data["base_tasks"]] == [t.accuracy for t in report.base_tasks]
    assert all(t["cached"] for r in data["results"] for t in r["tasks"])
    assert data["base_speed"] is None


def test_dry_run_prints_each_task_sets_cost(mistral4_split: Path, task_dir: Path) -> None:
    """Tokens decoded (the shared prefix once, every candidate's own tokens), log-softmax rows and
    the tool's logits buffer, with the model's tokenizer: here llama-spm, 32000 tokens."""
    from apex_orch.evaluation.session import BindingsModel
    from task_reference import _common_prefix
    r = _cli("eval", mistral4_split, "--tasks", f"hellaswag={task_dir / 'hs.txt'},mmlu={task_dir / 'mmlu.bin'}",
             "--dry-run")
    assert r.returncode == 0, r.stderr
    with BindingsModel(mistral4_split, vocab_only=True) as bm:
        tok = lambda text: bm.tokenize(text.encode()).tolist()  # noqa: E731
        for title, sets, parallel in (("HellaSwag", [[t.context + " " + e for e in t.endings] for t in S.HELLASWAG], 4),
                                      ("MMLU", [[t.question + " " + a for a in t.answers] for t in S.CHOICES], 16)):
            seqs = [[tok(c) for c in cands] for cands in sets]
            cps = [_common_prefix(s) for s in seqs]
            tokens = sum(cp + sum(len(x) - cp for x in s) for cp, s in zip(cps, seqs))
            rows = sum(1 + sum(len(x) - cp - 1 for x in s) for cp, s in zip(cps, seqs))
            line = (f"cost: ~{tokens:,} tokens decoded, ~{rows:,} log-softmax rows of 32,000; the tool's logits "
                    f"buffer {parallel * 4096 * 32000 * 4 / 2**30:.2f} GiB")
            assert line in r.stdout, (title, line, r.stdout)
    assert "12 of 12 tasks from" in r.stdout and "-np 16" in r.stdout
