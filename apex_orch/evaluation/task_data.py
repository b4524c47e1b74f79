"""Where the task data comes from: a file you give, or a pinned Hugging Face dataset file.

Takes: a task name (and optionally a path).
Gives: `SOURCES` (the files llama.cpp's own scripts and comments point to, one row per task:
repo, file, revision, sha256), `fetch` (the pinned file, fetched once into
`<cache>/tasks/<sha256>/` and checked against its sha256 on every use) and `pin_source` (for a
maintainer with network access: a repo's current commit and the file's sha256 there, the two
values a row needs).

A row without a revision and a sha256 is not pinned: `--tasks NAME` without a file refuses it
and says so, rather than trusting whatever the Hub serves today. HellaSwag's 6-line text file
(`hellaswag_val_full.txt`) is not on the Hub in that format (llama.cpp's
`scripts/get-hellaswag.sh` downloads it from GitHub), so it is always given by path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from apex_orch.core.errors import TaskError, ToolNotFoundError
from apex_orch.core.safefiles import write_atomic
from apex_orch.core.settings import cache_root, hf_hub_offline, hub_endpoint
from apex_orch.core.translate import translate_hub_download_error
from apex_orch.evaluation.task_files import read_task_bytes, task_kind

_VALIDATION = "ikawrakow/validation-datasets-for-llama.cpp"   # named in perplexity.cpp's multiple-choice comment


@dataclass(frozen=True)
class TaskSource:
    repo: str                   # a Hugging Face dataset repo
    filename: str
    revision: str | None        # a full commit sha; None: not pinned yet
    sha256: str | None          # of the file's bytes; None: not pinned yet
    origin: str                 # where llama.cpp points to it

    @property
    def pinned(self) -> bool:
        return bool(self.revision and self.sha256)

    @property
    def label(self) -> str:
        return f"hf:{self.repo}@{(self.revision or 'unpinned')[:12]}/{self.filename}"


# Revisions and sha256 are filled in by `pin_source` on a machine with network access; this
# project's build machines have none, so they are not pinned here yet.
SOURCES: dict[str, TaskSource] = {
    "winogrande": TaskSource("ikawrakow/winogrande-eval-for-llama.cpp", "winogrande-debiased-eval.csv", None, None,
                             "llama.cpp scripts/get-winogrande.sh"),
    "mmlu": TaskSource(_VALIDATION, "mmlu-validation.bin", None, None, "perplexity.cpp, multiple_choice_score"),
    "arc-challenge": TaskSource(_VALIDATION, "arc-challenge-validation.bin", None, None,
                                "perplexity.cpp, multiple_choice_score"),
    "arc-easy": TaskSource(_VALIDATION, "arc-easy-validation.bin", None, None, "perplexity.cpp, multiple_choice_score"),
    "truthfulqa": TaskSource(_VALIDATION, "truthful-qa-validation.bin", None, None,
                             "perplexity.cpp, multiple_choice_score"),
}


def tasks_cache_dir() -> Path:
    return cache_root() / "tasks"


def cached_path(source: TaskSource) -> Path:
    return tasks_cache_dir() / str(source.sha256) / source.filename


def _hub():
    try:   # imported on first use: huggingface_hub is slow to import and only fetched data needs it
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401  (core.translate reads the Hub's error types from it)
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ToolNotFoundError(f"huggingface_hub is not installed: {exc}") from exc
    return huggingface_hub


def _download(source: TaskSource, revision: str, what: str) -> str:
    try:
        return _hub().hf_hub_download(repo_id=source.repo, filename=source.filename, revision=revision,
                                      repo_type="dataset", endpoint=hub_endpoint())
    except Exception as exc:
        label = f"{source.repo}@{revision[:12]}/{source.filename}"
        state = "HF_HUB_OFFLINE=1" if hf_hub_offline() else "the Hub cannot be reached"
        error = translate_hub_download_error(
            exc, label=label, where=what, not_cached=f"{label}: {state} and the file is not in the cache",
            not_cached_hint="run once with network access to fetch it, or give the file as NAME=PATH",
            failed_hint="check the task source's repo, revision and file name")
        if error is None:
            raise
        raise TaskError(error.message, where=error.where, hint=error.hint, options=("tasks",)) from exc


def pinned_source(name: str) -> TaskSource:
    """The pinned Hub source of task `name`, or a TaskError saying why there is none."""
    kind = task_kind(name)
    source = SOURCES.get(kind.name)
    if source is None:
        raise TaskError(f"{kind.title} data has no pinned Hub source: give the file ({kind.name}=PATH)",
                        options=("tasks",),
                        hint="llama.cpp's scripts/get-hellaswag.sh names the file (hellaswag_val_full.txt)"
                        if kind.name == "hellaswag" else None)
    if not source.pinned:
        raise TaskError(f"the {kind.title} source {source.repo}/{source.filename} is not pinned yet (no verified "
                        f"revision and sha256 in apex_orch/evaluation/task_data.py)",
                        options=("tasks",),
                        hint=f"give the file ({kind.name}=PATH), or pin it with "
                             f"`python -m apex_orch.evaluation.task_data {kind.name}` on a machine with network access")
    return source


def fetch(name: str, source: TaskSource | None = None) -> tuple[Path, TaskSource]:
    """The pinned file for task `name`: from the apex-orch cache when its bytes still hash to the
    pin, else downloaded (through the Hugging Face cache), checked and stored there."""
    kind = task_kind(name)
    source = source or pinned_source(kind.name)
    dest = cached_path(source)
    if dest.is_file() and hashlib.sha256(read_task_bytes(dest)).hexdigest() == source.sha256:
        return dest, source
    local = _download(source, source.revision, f"task {kind.name}")
    data = read_task_bytes(local, f"downloaded {kind.title} file")
    got = hashlib.sha256(data).hexdigest()
    if got != source.sha256:
        raise TaskError(f"{source.label}: the downloaded file's sha256 is {got}, the pin says {source.sha256}",
                        where=local, hint="the Hub served other bytes than the pinned ones; nothing was cached")
    write_atomic(dest, data)
    return dest, source


def pin_source(name: str, revision: str = "main") -> TaskSource:
    """The row SOURCES should hold for `name`: the repo's commit at `revision` and the file's sha256
    there (needs the Hub; for maintainers)."""
    kind = task_kind(name)
    base = SOURCES.get(kind.name)
    if base is None:
        raise TaskError(f"{kind.title} has no Hub source to pin")
    info = _hub().HfApi(endpoint=hub_endpoint()).dataset_info(base.repo, revision=revision)
    local = _download(base, info.sha, f"pin {kind.name}")
    sha = hashlib.sha256(read_task_bytes(local)).hexdigest()
    return TaskSource(base.repo, base.filename, info.sha, sha, base.origin)


if __name__ == "__main__":  # pragma: no cover - maintainers: python -m apex_orch.evaluation.task_data NAME...
    import sys
    for arg in sys.argv[1:] or list(SOURCES):
        s = pin_source(arg)
        print(f'    "{arg}": TaskSource("{s.repo}", "{s.filename}", "{s.revision}",\n'
              f'                      "{s.sha256}", "{s.origin}"),')
