"""The CLI's glossary: what every option means, which exit codes each command can end with, what its
`--json` prints. One table each; docs/cli.md is generated from them and the Click commands
(`python tools/gen_cli_docs.py`), and tests/test_cli_glossary.py walks every command against them.

The rules they keep: one flag means one thing, with one type and one short form, in every command
that has it (a new meaning gets a new name); every command that produces a result has `--json`
(NO_JSON lists the exceptions and why); every long-running command has `-q`; `--help` ends with the
exit codes of EXITS. A new option is one row of TERMS (and of a command's EXITS when it can end
with a new code); the test says which row is missing.
"""

from __future__ import annotations

from apex_orch.core import errors as e
from apex_orch.plan.gates import RULES

# flag (every spelling: a pair's `--no-x` too) -> meaning. Per-command detail stays in each --help.
TERMS: dict[str, str] = {
    # global (before or after the command)
    "--debug": "Show tracebacks instead of one-line errors (before or after the command).",
    "--llama-bin-dir": "Folder of your own llama.cpp tools and libllama, searched first.",
    "--profiles-dir": "Folder of your own profiles (NAME.yaml), searched before the built-ins; repeatable.",
    "--version": "Show apex-orch's version and the llama.cpp build.",
    # results and output
    "--json": "Print the result as JSON on stdout (one schema per command, below).",
    "--quiet": "No progress output on stderr (results, warnings and errors are still printed).",
    "--dry-run": "Plan only: print what would run (outputs, sizes, commands) and stop, writing nothing.",
    "--output": "Write the result to this file (never one of the inputs).",
    "--out-dir": "Folder the outputs are written into.",
    "--force": "Replace existing outputs that are not up to date (stale, different or not ours); up-to-date "
               "outputs are kept.",
    "--redo": "Make the outputs again even when they are up to date (replacing them once verified).",
    "--csv": "Print the result as CSV on stdout.",
    "--args": "Print llama-quantize's --tensor-type arguments instead of the file --tensor-type-file reads.",
    "--plot": "Write a plot (.png, .svg or .pdf) of the result to this file.",
    "--baseline": "A file to hold the others against (repeatable): measured the same way, marked as a baseline, "
                  "no gates.",
    # what is quantized, and how
    "--profile": "APEX profile: a name (built-in or from --profiles-dir) or a .yaml path; quantize takes several, "
                 "comma-separated.",
    "--all": "Every profile.",
    "--demo": "Use the embedded demo model instead of MODEL (generated on first use).",
    "--model": "A GGUF model the command reads besides its main input (its names, template or tokenizer).",
    "--name": "Model name used in output file names (default: the GGUF's general.name).",
    "--imatrix": "Importance matrix file (GGUF) the quantization uses.",
    "--with-imatrix": "Plan as if an importance matrix is given.",
    "--without-imatrix": "For a file made without an importance matrix: no type that needs one (IQ1/IQ2/IQ3_XXS).",
    "--corpus": "Calibration corpus an importance matrix is built from: a name in corpora/ or a corpus YAML "
                "(cached by content).",
    "--imatrix-ctx": "Context (tokens per chunk) of a built importance matrix.",
    "--imatrix-chunks": "Chunks of the corpus a built importance matrix uses (default: all).",
    "--threads": "CPU threads for the llama.cpp work (default: all cores, shared between parallel jobs).",
    "--jobs": "Tiers quantized in parallel (default: from cores and free memory).",
    "--split-max-size": "Split each output into parts of at most this size (48G = 48GB = 48e9 bytes; GiB binary).",
    "--timeout": "Stop the llama.cpp tool after this many seconds (exit 8).",
    "--eval": "After quantizing, evaluate the outputs against the source (PPL, KLD table).",
    "--no-eval": "Do not evaluate after quantizing.",
    "--trust-tool-plan": "Take llama-quantize's own --dry-run types as the plan when they differ from apex-orch's.",
    "--allow-requantize": "Accept an already-quantized model as the source.",
    "--strict": "Fail when a tensor needs a row-size fallback or has no role.",
    "--tensors": "Also list every tensor with its type and reason.",
    "--ngl": "Layers offloaded to the GPU.",
    "--from-q8": "Compute on a cached Q8_0 copy of the model (for models larger than memory).",
    "--blocks": "Blocks of the canonical layout an imported file is read against (without --model).",
    "--base-ftype": "The llama-quantize FTYPE an imported tensor-type file was used with.",
    "--tier": "Display tier of the profile made (the card's and file names' tier).",
    # evaluation
    "--base": "Reference model (the F16/BF16 source) for KL divergence; its log-probs are cached.",
    "--text": "Evaluation text file: held-out text the quality is measured on.",
    "--eval-corpus": "Build the evaluation text from this corpus (a name in corpora/ or a corpus YAML) instead "
                     "of --text.",
    "--ctx": "Context (tokens) of the llama.cpp run the command evaluates with; eval scores each chunk's second "
             "half.",
    "--chunks": "Chunks of the evaluation text used (default: all).",
    "--batch": "Logical batch (default: the context, one decode per chunk).",
    "--ubatch": "Physical batch.",
    "--flash-attn": "Flash attention on.",
    "--no-flash-attn": "Flash attention off.",
    "--repack": "llama.cpp's extra buffer types (CPU repack/AMX kernels) on; they change the numbers slightly.",
    "--no-repack": "llama.cpp's extra buffer types off (the default).",
    "--backend": "Evaluate in-process (bindings) or with the llama-perplexity binary (same result fields).",
    "--tasks": "Task accuracy by llama-perplexity's scorers: NAME[=FILE],... (hellaswag, winogrande, mmlu, ...).",
    "--task-count": "Tasks to score per set: NAME=N or NAME=all; repeatable.",
    "--task-ctx": "The task scorers' context per sequence.",
    "--speed": "Measure llama-bench's pp512/tg128 tokens/s.",
    "--no-speed": "No speed measurement.",
    "--speed-reps": "llama-bench repetitions per speed test.",
    # sensitivity and fit
    "--types": "Candidate types, comma-separated.",
    "--base-profile": "Profile whose bands define the groups (and whose best-for line and corpus a fitted "
                      "profile keeps); default: APEX's own. A fit uses the bands its sensitivity was measured with.",
    "--method": "How sensitivity is measured: exact (KLD of spliced files) or proxy (imatrix-weighted error).",
    "--calibration": "An exact sensitivity result whose exact/proxy ratios put a proxy measurement in KLD units.",
    "--sensitivity": "A sensitivity result (`apex-orch sensitivity`) the fit reads.",
    "--size": "Target file size (48GB = 48G = 48e9 bytes; KiB/MiB/GiB/TiB binary).",
    "--bpw": "Target bits per weight.",
    "--structure": "apex: keep APEX's order (edges >= middle, shared expert and attention >= routed experts); "
                   "free: any type per group.",
    # release
    "--only": "Run only these phases (comma-separated).",
    "--skip": "Run every phase except these (comma-separated).",
    "--from-phase": "Start at this phase (the earlier ones' results are found, never recomputed).",
    "--push": "Upload the release to its Hugging Face repo.",
    "--no-calibration-upload": "Leave the calibration (imatrix, its text and manifest) out of the release folder "
                               "and the upload.",
    "--source": "Use this local GGUF instead of the config's source.",
    "--executor": "Where the heavy work runs: local, ray (a Ray cluster) or ray://HOST:PORT.",
    # build
    "--cmake-arg": "Extra CMake flag for your own llama.cpp build (-DNAME=VALUE); repeatable.",
    # speculative decoding
    "--draft": "The MTP head as a separate draft file (default: the head bundled in MODEL).",
    "--prompt": "The prompt generation starts from.",
    "--n-predict": "Tokens to generate.",
    "--draft-max": "Tokens the draft proposes per step.",
    "--log-dir": "Keep the tools' logs in this folder.",
}
# The gates: one option per row of plan.gates.RULES (fit's --max-kld-99-9 bounds its prediction the same way).
TERMS.update({rule.option: rule.help for rule in RULES})
TERMS["--max-kld-99-9"] = ("Upper bound on the 99.9th percentile of KLD: a gate on the measured value (eval, "
                           "compare: exit 15 above it), the bound a fitted profile's predicted value keeps (fit).")

# Short forms: each means its long flag in every command.
SHORT: dict[str, str] = {"-p": "--profile", "-o": "--output", "-c": "--ctx", "-t": "--threads", "-j": "--jobs",
                         "-q": "--quiet", "-b": "--batch", "-ub": "--ubatch", "-n": "--n-predict"}

# Every command ends with these: success, a usage error, a file-system failure no layer explains, a bug,
# an interrupt.
COMMON_EXITS: tuple[type[e.ApexError], ...] = (e.RequestError, e.FileSystemError, e.InternalError, e.InterruptedRun)

_WRITES = (e.OutputExistsError, e.OutputNotWritableError)
_EVAL = (e.ToolNotFoundError, e.ToolFailedError, e.EvalError, e.LockedError, e.OutputNotWritableError)

# Command -> the errors (so the exit codes) it can end with, besides COMMON_EXITS.
EXITS: dict[str, tuple[type[e.ApexError], ...]] = {
    "build": (e.BuildError, e.DiskSpaceError, e.OutputNotWritableError),
    "doctor": (),   # 1: a problem found (its report says what to run): OTHER_EXIT_CODES
    "inspect": (e.ModelError,),
    "plan": (e.ProfileError, e.ModelError, e.PlanError),
    "render": (e.ProfileError, e.ModelError, e.PlanError, *_WRITES),
    "profile list": (e.ProfileError,),
    "profile show": (e.ProfileError,),
    "profile import": (e.ProfileError, e.ModelError, *_WRITES),
    "corpus list": (e.ProfileError,),
    "corpus show": (e.ProfileError,),
    "corpus build": (e.ProfileError, e.ModelError, e.ToolNotFoundError, *_WRITES),
    "imatrix": (e.ProfileError, e.ModelError, e.ImatrixError, e.ToolNotFoundError, e.ToolFailedError,
                e.LockedError, e.DiskSpaceError, *_WRITES),
    "imatrix-report": (e.ProfileError, e.ModelError, e.PlanError, e.ImatrixError),
    "quantize": (e.ProfileError, e.ModelError, e.PlanError, e.ImatrixError, e.ToolNotFoundError, e.ToolFailedError,
                 e.LockedError, e.DiskSpaceError, e.VerificationError, e.ManifestError, e.EvalError, *_WRITES),
    "eval": (e.ProfileError, e.ModelError, *_EVAL, e.GateFailedError, e.TaskError),
    "compare": (e.ProfileError, e.ModelError, *_EVAL, e.GateFailedError, e.TaskError, e.OutputExistsError),
    "sensitivity": (e.ProfileError, e.ModelError, e.PlanError, e.ImatrixError, *_EVAL, e.DiskSpaceError,
                    e.VerificationError, e.ManifestError, e.ResultFileError, e.OutputExistsError),
    "fit": (e.ProfileError, e.ModelError, e.PlanError, e.ResultFileError, *_WRITES),
    "release": (e.ConfigError, e.ModelError, e.PlanError, e.ImatrixError, e.ToolNotFoundError, e.ToolFailedError,
                e.LockedError, e.DiskSpaceError, e.VerificationError, e.ManifestError, e.EvalError, e.GateFailedError,
                e.PublishError, e.ExecutorError, e.ResultFileError, e.TaskError, e.BaselineError, *_WRITES),
    "speculate": (e.ModelError, e.ToolNotFoundError, e.ToolFailedError, e.EvalError, e.OutputNotWritableError),
}

# Commands whose work takes long enough to show progress: they have -q.
LONG_RUNNING = ("build", "corpus build", "imatrix", "quantize", "eval", "compare", "sensitivity", "fit", "release",
                "speculate")

# Commands without --json, and why.
NO_JSON: dict[str, str] = {
    "build": "its result is the build folder, which `doctor --json` reports",
}

# Command -> what its --json prints (top-level keys). Where --dry-run has a JSON form, it is described too.
RESULTS: dict[str, str] = {
    "doctor": "an object: apex_orch, python, llama_cpp_build, build_info, cache, tools, tool_versions, problems, "
             "warnings, pinned_build, libllama, bindings, shared_libllama, workdir, free_disk_bytes.",
    "inspect": "an object: path, name, architecture, blocks, embedding_length, experts, leading_dense_blocks, "
              "nextn_layers, mtp_draft, attention, context_length, rope, vocab_size, total_parameters, "
              "active_parameters, active_parameters_counts, file_size, source_type, roles, role_decisions, "
              "structure, warnings, tensor_count.",
    "plan": "the whole plan: model, profile, bands, has_imatrix, total_bytes, predicted_file_size, bpw, "
           "fallbacks, roles (bytes and types per role), warnings, rules, tensors (every tensor: its role, "
           "block, band, requested and final type, bytes, reason).",
    "render": "an object: profile, model, rules (a list of {pattern, type, tensors}), text (what --tensor-type-file "
              "reads), output (the file written, or null).",
    "profile list": "a list, one object per profile: name, tier, base_ftype, imatrix_required, corpus, best_for, "
                    "source, shadows_builtin, path, chain (each link: path, source, shadows_builtin).",
    "profile show": "the resolved profile: name, tier, sha256, chain, chain_sources and its YAML keys.",
    "profile import": "an object: profile (the YAML as data), yaml, output (or null), not_understood, accidental, "
                      "unused.",
    "corpus list": "a list, one object per corpus: name, description, budget_tokens_approx, sources.",
    "corpus show": "the corpus: name, definition, description, seed, budget_tokens_approx, dedupe, shuffle, documents, "
                  "bytes, approx_tokens, sources (each: id, weight, documents, bytes, tokens), warnings.",
    "corpus build": "an object: text, manifest (the two files written) and the manifest's fields (sha256, bytes, "
                    "documents, tokens, tokens_method, sources, warnings...).",
    "imatrix": "an object: imatrix (the file, or null with --dry-run), cache, cached, model, corpus, corpus_sha256, "
               "ctx, chunks, available_chunks, tokens, key, output, argv, warnings.",
    "imatrix-report": "the report: file, chunks, chunk_size, datasets, entries, tensors, experts and "
                      "experts_never_routed, entries_without_data; with --model, model (name, arch, expert_count, "
                      "expected, covered, missing, not_expected); with --profile the planned low-bit tensors "
                      "lacking data.",
    "quantize": "an object: model, tiers (each: tier, profile, output, files, status `written` or `up to date`, "
                "seconds, message), eval (compare's JSON of the outputs, or null). With --dry-run: model, tiers "
                "(each: tier, profile, output, predicted_bytes, bpw, argv (null while it waits for the imatrix), "
                "waits_for_imatrix), imatrix_to_build (corpus, ctx, chunks, or null), warnings.",
    "eval": "the result: model, backend, settings, text, n_tokens, n_chunks, n_scored, ppl, ppl_err, base, "
           "base_ppl, base_ppl_err, kld (llama-perplexity's KL statistics), speed, tasks, seconds, llama_build, "
           "cache, notes.",
    "compare": "an object: backend, settings, text, base, base_ppl, base_ppl_err, base_speed, base_tasks, gates, "
              "rows (one per file: tier, size, bpw, PPL, KLD mean/99.9%/max, same top p, tasks, speed, gate "
              "failures), results (each file's eval result), plot (the file written, or null).",
    "sensitivity": "an object: result (the cached result file), output (the -o copy, or null), data (the result: "
                   "model, ladder, groups, measurements per group and type, uniform, cost).",
    "fit": "an object: target, budget_bytes, file_bytes, under_budget_by, within_0.5%, bpw, predicted_kld_mean, "
           "predicted_kld_p999, max_kld_p999, additivity, steps, output (or null), profile_yaml.",
    "release": "the run: release_folder, seconds, phases (each: name, status, seconds, detail), tasks (each: "
               "phase, target, worker, seconds, attempts). With --dry-run: the ReleasePreview (docs/release.md).",
    "speculate": "the result: model, draft, head, settings, with_head and without_head (each: n_predict, n_drafted, "
                "n_accept, decoded_tokens, decode_seconds, tokens_per_s, text), acceptance, speed_ratio, same_output, "
                "llama_cpp.",
}


def exit_classes(command: str) -> tuple[type[e.ApexError], ...]:
    """COMMON_EXITS + the command's own, in code order (a KeyError for a command EXITS lacks)."""
    found = {c.exit_code: c for c in (*COMMON_EXITS, *EXITS[command])}
    return tuple(found[k] for k in sorted(found))


def exit_codes_of(command: str) -> list[int]:
    """The exit codes `command` can end with: 0, its errors' codes, and doctor's 1."""
    codes = {0, *(c.exit_code for c in exit_classes(command))}
    if command == "doctor":
        codes.add(1)
    return sorted(codes)


def short_meaning(code: int) -> str:
    """A code's meaning from the table, cut before its first parenthesis or semicolon."""
    meaning = e.exit_codes()[code]
    return meaning.split(" (")[0].split(";")[0].strip()


def exits_epilog(command: str) -> str:
    """The lines `--help` ends with (Click keeps them as written after \\b)."""
    lines = ["\b", "Exit codes:"] + [f"  {code:<4} {short_meaning(code)}" for code in exit_codes_of(command)]
    return "\n".join(lines)
