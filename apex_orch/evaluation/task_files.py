"""Task files for llama-perplexity's built-in scorers: the three formats, read strictly and written.

Takes: a task name (hellaswag, winogrande, mmlu, arc-challenge, arc-easy, truthfulqa) and a file.
Gives: `TASK_KINDS` (which scorer reads which task, and the task count the APEX pipeline scores by
default), `read_task_set` (the file's facts and its tasks, exactly the tasks the pinned tool will
read, or one `TaskError` naming the line or task that is wrong) and the writers
(`write_hellaswag`, `write_winogrande`, `write_multiple_choice`) for making task sets of your own.

The formats, as the pinned `tools/perplexity/perplexity.cpp` reads them:

- HellaSwag (`--hellaswag`, text through `-f`): 6 lines per task — the context, the index of the
  gold ending (0..3), the 4 endings. `-f` drops one trailing newline; lines are what
  `std::getline` yields.
- Winogrande (`--winogrande`, CSV through `-f`): `index,sentence,option1,option2,answer` with one
  `_` in the sentence where an option goes and answer 1 or 2; the sentence may be quoted (its
  commas are then kept), the options may not. A row that does not parse is skipped by the tool
  with a log line, so a header row is skipped that way; we accept a header on line 1 only and
  refuse any other bad row. The tool reads a row only when a newline follows it *after* `-f`
  dropped the file's last one, so the last row of a file that ends in one newline is never
  scored: we count what the tool reads and say so in the set's notes.
- Multiple choice (`--multiple-choice`, binary through `-bf`: MMLU, ARC, TruthfulQA): uint32
  task count N, N uint32 byte offsets of the tasks, then per task: string question, then
  `mc1` and `mc2` answer lists (uint32 count <= 100, that many strings, that many int32
  labels); a string is a uint32 length and its bytes (little-endian). Only `mc1` is scored; the
  task is right when the label of the most likely answer is 1. The tool reads the tasks in
  order when it scores all of them and seeks to the offsets when it draws a subset, so the
  offsets must be where the tasks are; we also require one label 1 per `mc1` and no bytes after
  the last task.

Reading is bounded (`MAX_TASK_FILE_BYTES`) and takes regular files only: a FIFO, a device or a
folder is refused before a byte is read. (A small reader of its own here, until the project's
shared reader for user files exists.)
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from apex_orch.core.errors import TaskError
from apex_orch.core.safefiles import write_atomic

MAX_TASK_FILE_BYTES = 256 << 20      # the largest llama.cpp task file (MMLU test) is ~10 MB
MAX_ANSWERS = 100                    # the tool's own limit per answer list

HELLASWAG, WINOGRANDE, MULTIPLE_CHOICE = "hellaswag", "winogrande", "multiple-choice"


@dataclass(frozen=True)
class TaskKind:
    name: str                   # as --tasks spells it
    title: str                  # as tables print it
    scorer: str                 # HELLASWAG | WINOGRANDE | MULTIPLE_CHOICE
    default_limit: int | None   # tasks scored by default (the APEX pipeline's); None: all of them


TASK_KINDS: dict[str, TaskKind] = {k.name: k for k in (
    TaskKind("hellaswag", "HellaSwag", HELLASWAG, 400),
    TaskKind("winogrande", "Winogrande", WINOGRANDE, 400),
    TaskKind("mmlu", "MMLU", MULTIPLE_CHOICE, None),
    TaskKind("arc-challenge", "ARC-Challenge", MULTIPLE_CHOICE, None),
    TaskKind("arc-easy", "ARC-Easy", MULTIPLE_CHOICE, None),
    TaskKind("truthfulqa", "TruthfulQA", MULTIPLE_CHOICE, None),
)}


def task_kind(name: str) -> TaskKind:
    kind = TASK_KINDS.get(name.strip().lower())
    if kind is None:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASK_KINDS)}",
                        hint="name a task, optionally with its file: hellaswag=FILE,mmlu=FILE", options=("tasks",))
    return kind


# --------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class HellaSwagTask:
    context: str
    endings: tuple[str, str, str, str]
    gold: int                                 # 0..3


@dataclass(frozen=True)
class WinograndeTask:
    sentence: str                             # one "_" where an option goes
    choices: tuple[str, str]
    answer: int                               # 1 or 2

    @property
    def parts(self) -> tuple[str, str]:
        """The sentence before and after its first "_" (the tool's `first` and `second`)."""
        first, _, second = self.sentence.partition("_")
        return first, second


@dataclass(frozen=True)
class ChoiceTask:
    question: str
    answers: tuple[str, ...]                  # mc1: the scored answers
    correct: int                              # index of the one answer labelled 1
    mc2_answers: tuple[str, ...] = ()         # read, carried, never scored (as in the tool)
    mc2_labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class TaskFile:
    """What a task file is, as the tool will read it."""
    task: str                   # TaskKind.name
    scorer: str
    path: str
    label: str                  # the path, or hf:<repo>@<revision>/<file> for fetched data
    sha256: str
    n_bytes: int
    n_tasks: int                # tasks the tool reads from it
    max_answers: int            # most candidate endings in one task
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSet:
    file: TaskFile
    tasks: tuple                # HellaSwagTask | WinograndeTask | ChoiceTask, in file order


# --------------------------------------------------------------------------- reading

def read_task_bytes(path: str | os.PathLike, what: str = "task file") -> bytes:
    """The whole file through core.infiles (a regular file, opened without blocking so a FIFO is
    refused instead of waited on, at most MAX_TASK_FILE_BYTES)."""
    from apex_orch.core.infiles import KINDS, InputKind, read_input

    base = KINDS["tasks"]
    return read_input(path, InputKind("tasks", what + "s", MAX_TASK_FILE_BYTES, TaskError, base.hint))


def _text(raw: bytes, where: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{what} is not UTF-8 text (byte {exc.start})", where=where) from None


def _tool_prompt(data: bytes) -> bytes:
    """What `-f` hands the scorer: the file with one trailing newline removed."""
    return data[:-1] if data.endswith(b"\n") else data


def parse_hellaswag(data: bytes, path: str) -> tuple[list[HellaSwagTask], list[str]]:
    prompt = _tool_prompt(data)
    lines = prompt.split(b"\n")
    if not prompt or prompt.endswith(b"\n"):
        lines.pop()                           # std::getline yields no empty last line
    if not lines:
        raise TaskError("no tasks: the file is empty", where=path)
    if len(lines) % 6:
        raise TaskError(f"{len(lines)} lines is not a multiple of 6 (a task is its context, the gold ending's "
                        f"index and 4 endings): the task from line {len(lines) // 6 * 6 + 1} is incomplete",
                        where=path, hint="llama-perplexity refuses such a file; check the last task")
    tasks = []
    for t in range(len(lines) // 6):
        cells = []
        for k in range(6):
            lineno = 6 * t + k + 1
            where = f"{path}:{lineno}"
            text = _text(lines[6 * t + k], where, f"task {t + 1}")
            if "\r" in text:
                raise TaskError(f"task {t + 1}: carriage return in the line (CRLF line ends?); llama-perplexity "
                                "would keep it in the text", where=where, hint="convert the file to LF line ends")
            if k != 1 and not text.strip():
                raise TaskError(f"task {t + 1}: empty {'context' if k == 0 else f'ending {k - 2}'}", where=where)
            cells.append(text)
        if not re.fullmatch(r"[0-3]", cells[1]):
            raise TaskError(f"task {t + 1}: the gold ending's index is {cells[1]!r}, not 0, 1, 2 or 3",
                            where=f"{path}:{6 * t + 2}")
        tasks.append(HellaSwagTask(cells[0], tuple(cells[2:6]), int(cells[1])))
    return tasks, []


def _winogrande_fields(line: bytes) -> list[bytes] | None:
    """The tool's split: the first 4 commas outside double quotes; None when there are fewer."""
    commas, quoted = [], False
    for i, ch in enumerate(line):
        if quoted:
            quoted = ch != 0x22
        elif ch == 0x2C:
            commas.append(i)
            if len(commas) == 4:
                break
        elif ch == 0x22:
            quoted = True
    if len(commas) != 4:
        return None
    c0, c1, c2, c3 = commas
    sentence = line[c0 + 2:c1 - 1] if line[c0 + 1:c0 + 2] == b'"' else line[c0 + 1:c1]
    return [line[:c0], sentence, line[c1 + 1:c2], line[c2 + 1:c3], line[c3 + 1:]]


def parse_winogrande(data: bytes, path: str) -> tuple[list[WinograndeTask], list[str]]:
    pieces = _tool_prompt(data).split(b"\n")
    read, unread = pieces[:-1], pieces[-1]
    tasks, notes = [], []
    for i, raw in enumerate(read):
        where = f"{path}:{i + 1}"
        fields = _winogrande_fields(raw)
        answer = fields[4].rstrip(b"\r") if fields else b""
        if i == 0 and fields is not None and not answer.strip().isdigit():
            continue                          # a header row: the tool skips it too
        if fields is None:
            raise TaskError("expected 5 comma-separated fields: index,sentence,option1,option2,answer", where=where,
                            hint="quote a sentence that holds commas; options may not hold commas")
        if answer not in (b"1", b"2"):
            raise TaskError(f"the answer is {answer.decode('utf-8', 'replace')!r}, not 1 or 2", where=where)
        sentence = _text(fields[1], where, "the sentence")
        if "_" not in sentence:
            raise TaskError("the sentence has no '_' where an option goes", where=where)
        choices = (_text(fields[2], where, "option1"), _text(fields[3], where, "option2"))
        if not all(c.strip() for c in choices):
            raise TaskError("an option is empty", where=where)
        tasks.append(WinograndeTask(sentence, choices, int(answer)))
    if unread.strip():
        notes.append(f"line {len(pieces)} is not scored: llama-perplexity's -f drops the file's final newline and "
                     "its CSV reader skips a row that no newline follows (end the file with an empty line to "
                     "include it)")
    if not tasks:
        raise TaskError("no tasks: the file holds no row llama-perplexity reads", where=path)
    return tasks, notes


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.off = data, path, 0

    def u32(self, what: str) -> int:
        if self.off + 4 > len(self.data):
            raise TaskError(f"{what}: the file ends at byte {len(self.data)}", where=self.path,
                            hint="the file is truncated or not in llama.cpp's multiple-choice format")
        (value,) = struct.unpack_from("<I", self.data, self.off)
        self.off += 4
        return value

    def string(self, what: str) -> str:
        n = self.u32(what)
        if self.off + n > len(self.data):
            raise TaskError(f"{what}: a {n:,}-byte string runs past the end of the file", where=self.path,
                            hint="the file is truncated or not in llama.cpp's multiple-choice format")
        raw = self.data[self.off:self.off + n]
        self.off += n
        return _text(raw, self.path, what)

    def answers(self, what: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        n = self.u32(f"{what} count")
        if n > MAX_ANSWERS:
            raise TaskError(f"{what}: {n:,} answers; llama-perplexity reads at most {MAX_ANSWERS}", where=self.path,
                            hint="the file is damaged or not in llama.cpp's multiple-choice format")
        answers = tuple(self.string(f"{what} answer {j + 1}") for j in range(n))
        labels = tuple(struct.unpack("<i", struct.pack("<I", self.u32(f"{what} label {j + 1}")))[0]
                       for j in range(n))
        if any(v not in (0, 1) for v in labels):
            raise TaskError(f"{what}: labels {list(labels)} are not all 0 or 1", where=self.path)
        return answers, labels


def parse_multiple_choice(data: bytes, path: str) -> tuple[list[ChoiceTask], list[str]]:
    r = _Reader(data, path)
    n_task = r.u32("the task count")
    if n_task == 0:
        raise TaskError("no tasks: the task count is 0", where=path)
    if 4 + 4 * n_task > len(data):
        raise TaskError(f"the task count is {n_task:,}, but the file ({len(data):,} bytes) cannot hold its "
                        "table of task offsets", where=path,
                        hint="the file is truncated or not in llama.cpp's multiple-choice format")
    offsets = struct.unpack_from(f"<{n_task}I", data, 4)
    r.off = 4 + 4 * n_task
    tasks = []
    for i in range(n_task):
        what = f"task {i + 1}"
        if offsets[i] != r.off:
            raise TaskError(f"{what}: the offset table says byte {offsets[i]:,}, but the task starts at byte "
                            f"{r.off:,}", where=path,
                            hint="llama-perplexity seeks to the offsets when it scores a subset: they must match")
        question = r.string(f"{what} question")
        answers, labels = r.answers(f"{what} mc1")
        mc2_answers, mc2_labels = r.answers(f"{what} mc2")
        if not question.strip():
            raise TaskError(f"{what}: empty question", where=path)
        if not answers or not all(a.strip() for a in answers):
            raise TaskError(f"{what}: {'no answers' if not answers else 'an empty answer'}", where=path)
        if labels.count(1) != 1:
            raise TaskError(f"{what}: {labels.count(1)} answers are labelled correct; mc1 needs exactly one",
                            where=path)
        tasks.append(ChoiceTask(question, answers, labels.index(1), mc2_answers, mc2_labels))
    if r.off != len(data):
        raise TaskError(f"{len(data) - r.off:,} bytes follow the last task", where=path,
                        hint="the file is damaged or not in llama.cpp's multiple-choice format")
    return tasks, []


_PARSERS = {HELLASWAG: parse_hellaswag, WINOGRANDE: parse_winogrande, MULTIPLE_CHOICE: parse_multiple_choice}


def read_task_set(task: str | TaskKind, path: str | os.PathLike, *, label: str | None = None,
                  data: bytes | None = None) -> TaskSet:
    """Read and check a task file for `task` (its scorer decides the format); `data`: the bytes
    already read (and hashed) by the caller."""
    kind = task if isinstance(task, TaskKind) else task_kind(task)
    p = str(path)
    if data is None:
        data = read_task_bytes(p, f"{kind.title} task file")
    tasks, notes = _PARSERS[kind.scorer](data, p)
    most = max(len(t.answers) for t in tasks) if kind.scorer == MULTIPLE_CHOICE else (
        4 if kind.scorer == HELLASWAG else 2)
    facts = TaskFile(task=kind.name, scorer=kind.scorer, path=p, label=label or p,
                     sha256=hashlib.sha256(data).hexdigest(), n_bytes=len(data), n_tasks=len(tasks),
                     max_answers=most, notes=tuple(notes))
    return TaskSet(facts, tuple(tasks))


# --------------------------------------------------------------------------- writing

def _one_line(text: str, what: str) -> str:
    if not text.strip() or "\n" in text or "\r" in text:
        raise TaskError(f"{what} must be one non-empty line: {text!r}")
    return text


def write_hellaswag(path: str | os.PathLike, tasks: Iterable[HellaSwagTask]) -> Path:
    lines = []
    for i, t in enumerate(tasks, 1):
        if len(t.endings) != 4 or t.gold not in range(4):
            raise TaskError(f"task {i}: a HellaSwag task has 4 endings and a gold index 0..3")
        lines += [_one_line(t.context, f"task {i} context"), str(t.gold),
                  *(_one_line(e, f"task {i} ending") for e in t.endings)]
    return write_atomic(Path(path), "\n".join(lines) + "\n")


def write_winogrande(path: str | os.PathLike, tasks: Iterable[WinograndeTask]) -> Path:
    """A CSV with a header row, ending in an empty line so that the tool reads its last row."""
    rows = ["index,sentence,option1,option2,answer"]
    for i, t in enumerate(tasks):
        s = _one_line(t.sentence, f"task {i + 1} sentence")
        if "_" not in s or '"' in s or t.answer not in (1, 2):
            raise TaskError(f"task {i + 1}: a sentence holds one '_' and no '\"'; the answer is 1 or 2")
        for c in t.choices:
            if "," in _one_line(c, f"task {i + 1} option") or '"' in c:
                raise TaskError(f"task {i + 1}: option {c!r} may not hold ',' or '\"' (the tool cannot read them)")
        sentence = f'"{s}"' if "," in s else s    # the tool drops the quotes of a quoted sentence
        rows.append(f"{i},{sentence},{t.choices[0]},{t.choices[1]},{t.answer}")
    return write_atomic(Path(path), "\n".join(rows) + "\n\n")


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _answer_list(answers: Sequence[str], labels: Sequence[int]) -> bytes:
    return (struct.pack("<I", len(answers)) + b"".join(_string(a) for a in answers)
            + struct.pack(f"<{len(labels)}i", *labels))


def write_multiple_choice(path: str | os.PathLike, tasks: Iterable[ChoiceTask]) -> Path:
    blobs = []
    for i, t in enumerate(tasks, 1):
        if not t.question.strip() or not t.answers or not all(a.strip() for a in t.answers) \
                or t.correct not in range(len(t.answers)) or len(t.answers) > MAX_ANSWERS:
            raise TaskError(f"task {i}: a question, 1..{MAX_ANSWERS} non-empty answers and the correct one's index")
        labels = [int(j == t.correct) for j in range(len(t.answers))]
        blobs.append(_string(t.question) + _answer_list(t.answers, labels)
                     + _answer_list(t.mc2_answers, t.mc2_labels))
    offsets, pos = [], 4 + 4 * len(blobs)
    for b in blobs:
        offsets.append(pos)
        pos += len(b)
    data = struct.pack(f"<I{len(blobs)}I", len(blobs), *offsets) + b"".join(blobs)
    return write_atomic(Path(path), data)


__all__ = ["TASK_KINDS", "TaskKind", "TaskFile", "TaskSet", "HellaSwagTask", "WinograndeTask", "ChoiceTask",
           "task_kind", "read_task_set", "read_task_bytes", "write_hellaswag", "write_winogrande",
           "write_multiple_choice", "MAX_TASK_FILE_BYTES", "HELLASWAG", "WINOGRANDE", "MULTIPLE_CHOICE"]
