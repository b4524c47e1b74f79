"""Integrity: verification means the bytes; inputs are never outputs; nothing
outside the output folder is touched; two tiers never share one file name.

Finding 1 needs files larger than the 8 MiB head the old sampled fingerprint read in full, and a
change between its sampled blocks: those cases use the synthetic mistral4-split model (its
Compact far above 8 MiB; the trained demo's files are smaller) and change bytes in the middle
of the tensor data (`flip_middle`). The other
cases use the 4-block tiny model. Real llama-quantize / llama-imatrix / bindings throughout; a
FAKE llama-quantize (the `tripwire`) only where a case must prove that no tool was started, and
a FAKE Hub on 127.0.0.1 (tests/hubserver.py) for publish.

The whole module runs under its own APEX_ORCH_CACHE (the pinned build linked in), so the
imatrix, eval and sha256-memo caches start empty and the real cache is never written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from apex_orch.llama import pin
from apex_orch.core import safefiles
from apex_orch.core.errors import OutputIsInputError, PublishError, UnsafeOutputError
from relkit import assert_one_error, cli, compact_output, snapshot

BIG = "Synthetic-Mistral4-Split"   # general.name of the big model
VICTIM_TEXT = "precious bytes outside the output folder\n"


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("integrity-cache")
    (cache / pin.PIN_KEY).symlink_to(pin.pin_dir())
    mp = pytest.MonkeyPatch()
    mp.setenv("APEX_ORCH_CACHE", str(cache))
    mp.delenv("APEX_ORCH_EVAL_CACHE", raising=False)
    yield cache
    mp.undo()


@pytest.fixture(scope="module")
def big_model(module_cache, mistral4_split) -> Path:
    """A model whose files are larger than the old fingerprint's 8 MiB head (tests/conftest.py)."""
    return mistral4_split


@pytest.fixture(scope="module")
def big_compact(tmp_path_factory, big_model) -> Path:
    """A finished `quantize BIG -p compact` folder (real llama-quantize)."""
    out = tmp_path_factory.mktemp("big-compact")
    r = cli("quantize", big_model, "-p", "compact", "--out-dir", out, "-t", "2", "--no-eval", "-q")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def big_release(tmp_path_factory, big_model) -> tuple[Path, Path]:
    """(config, folder) of a finished one-tier release of the big model (no imatrix, no eval)."""
    root = tmp_path_factory.mktemp("big-release")
    cfg = root / "cfg" / "release.yaml"
    cfg.parent.mkdir()
    cfg.write_text("name: Demo-Integrity\nlicense: mit\nsource: {gguf: " + str(big_model) + "}\ntiers: [compact]\n"
                   "eval: {enabled: false}\npublish: {repo: apex-orch/Demo-Integrity-APEX-GGUF}\n")
    out = root / "release"
    r = cli("release", cfg, "--out-dir", out, "-j", "1", "-q")
    assert r.exit_code == 0, r.output
    return cfg, out


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every output folder; planted links point at it. It must never change."""
    p = tmp_path / "elsewhere" / "victim.txt"
    p.parent.mkdir()
    p.write_text(VICTIM_TEXT)
    return p


def flip_middle(path: Path, n: int) -> int:
    """Invert n bytes in the middle of the tensor data, half-way between two of the blocks the old
    fingerprint sampled (8 MiB head, then 16 blocks of 64 KiB at fixed fractions of the file), so
    only a full hash sees it. Returns the offset."""
    head, block, samples = 8 << 20, 64 << 10, 16
    size = path.stat().st_size
    step = (size - head - block) // (samples - 1)
    off = head + 7 * step + (step - n) // 2
    assert size > head + 2 * block and step > n + block, "file too small for the case"
    with open(path, "r+b") as fh:
        fh.seek(off)
        data = fh.read(n)
        fh.seek(off)
        fh.write(bytes(b ^ 0xFF for b in data))
    return off


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant_link(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


# ---------------------------------------------------------------------------- 1. the bytes

def test_rerun_refuses_an_output_whose_bytes_changed(big_compact, big_model, tmp_path):
    """Finding 1: 64 KiB overwritten in the middle of a finished output; the rerun said
    "Compact: up to date". Now the stat check sees the write, the full sha256 differs: refused."""
    out = tmp_path / "out"
    shutil.copytree(big_compact, out)
    gguf = out / f"{BIG}-APEX-Compact.gguf"
    # untouched copy: new inodes, so the first check re-hashes in full and finds the same bytes
    r = cli("quantize", big_model, "-p", "compact", "--out-dir", out, "--no-eval")
    assert r.exit_code == 0, r.output
    assert f"{gguf.name}: up to date (manifest matches inputs)" in r.output
    corrupted = flip_middle(gguf, 64 << 10)
    assert corrupted > 8 << 20
    before = sha256(gguf)
    r = cli("quantize", big_model, "-p", "compact", "--out-dir", out, "--no-eval")
    assert_one_error(r.output, 9, r.exit_code,
                     f"{gguf} already exists and is not up to date ({gguf.name} changed since it was written)")
    assert sha256(gguf) == before              # refused, nothing replaced without --force


def test_touched_but_identical_output_stays_up_to_date(big_compact, big_model, tmp_path):
    """A changed mtime alone is a re-hash, not a rebuild: the same bytes are still up to date."""
    out = tmp_path / "out"
    shutil.copytree(big_compact, out)
    gguf = out / f"{BIG}-APEX-Compact.gguf"
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))
    r = cli("quantize", big_model, "-p", "compact", "--out-dir", out, "--no-eval")
    assert r.exit_code == 0, r.output
    assert f"{gguf.name}: up to date (manifest matches inputs)" in r.output


def test_rerun_after_the_source_bytes_changed_is_not_up_to_date(big_model, tmp_path):
    """Finding 1: 2 MB of the source's weights overwritten; the rerun said "up to date". The
    manifest's source key is now the source's full sha256: the inputs changed."""
    src = tmp_path / "src.gguf"
    shutil.copyfile(big_model, src)
    out = tmp_path / "out"
    r = cli("quantize", src, "-p", "compact", "--out-dir", out, "-t", "2", "--no-eval", "-q")
    assert r.exit_code == 0, r.output
    import json
    gguf = out / f"{BIG}-APEX-Compact.gguf"
    manifest = json.loads(gguf.with_name(gguf.name + ".manifest.json").read_text())
    assert manifest["inputs"]["source"] == [sha256(src)]
    rec = manifest["files"][0]
    st = gguf.stat()
    assert (rec["size"], rec["mtime_ns"], rec["inode"], rec["sha256"]) == (st.st_size, st.st_mtime_ns, st.st_ino,
                                                                           sha256(gguf))
    flip_middle(src, 2_000_000)
    r = cli("quantize", src, "-p", "compact", "--out-dir", out, "--no-eval")
    assert_one_error(r.output, 9, r.exit_code, f"{gguf} already exists and is not up to date (inputs changed)")


def test_cache_keys_that_name_a_source_follow_its_bytes(big_model, tmp_path, eval_text):
    """Finding 1: the imatrix cache key, the --from-q8 Q8_0 copy and the eval base log-prob cache
    were keyed by the sampled fingerprint, so 2 MB of new weights reused the old entries. Each is
    now keyed by the source's full sha256 (memoised: an unchanged source is not read again)."""
    from apex_orch.evaluation import base_cache as base_logprobs, evaluate as ev
    from apex_orch.evaluation.inputs import EvalSettings, model_facts, text_facts
    from apex_orch.core import fingerprint
    from apex_orch.calibration import imatrix as im
    src = tmp_path / "src.gguf"
    shutil.copyfile(big_model, src)

    def keys():
        plan = im.plan_imatrix(src, "diverse", ctx=128, chunks=4, tokens=100_000, from_q8=True)
        base = model_facts(src)
        base_cache = base_logprobs.cache_path(ev.base_cache_inputs(base, text_facts(text=eval_text),
                                                                  EvalSettings()))
        return plan.key_material["model"], plan.key, plan.q8_path, base.fingerprint, base_cache

    first = keys()
    assert first[0] == first[3] == sha256(src)
    assert fingerprint._memo_lookup(os.path.realpath(src), os.stat(src)) == first[0]   # hashed once, remembered
    assert keys() == first                                           # unchanged: the same keys
    flip_middle(src, 2_000_000)
    second = keys()
    assert second[0] == second[3] == sha256(src) != first[0]
    assert [a != b for a, b in zip(first, second)] == [True] * 5


@pytest.fixture
def hub(monkeypatch):
    """A fake Hugging Face Hub on 127.0.0.1 (tests/hubserver.py) that the real huggingface_hub
    client talks to: it records every request and keeps what arrives."""
    from hubserver import running_hub   # tests/hubserver.py: only the publish case needs it
    with running_hub(monkeypatch) as server:
        yield server


def test_publish_hashes_what_it_uploads(big_release, hub, monkeypatch):
    """Finding 1: publish took the sha256 from the manifest and checked only the size. Here the
    bytes change and the mtime is set back, so even the stat check passes: publish's own full
    hash refuses the file before anything is uploaded. (Bytes restored afterwards, and then the
    same publish reaches the Hub: the refusal was publish's own.)"""
    from apex_orch.release import runner as rel
    from apex_orch.release.config_reader import load_release
    monkeypatch.setenv("HF_TOKEN", "hf_integrityTestToken0123456789abcd")
    cfg, out = big_release
    gguf = out / "Demo-Integrity-APEX-Compact.gguf"
    st = gguf.stat()
    good = sha256(gguf)
    flip_middle(gguf, 64 << 10)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        with pytest.raises(PublishError) as err:
            rel.run_release(load_release(cfg), phases=["publish"], push=True, out_dir=out)
        msg = err.value.render()
        assert msg.startswith(f"{gguf}: Demo-Integrity-APEX-Compact.gguf changed since it was written: its sha256 "
                              f"is {sha256(gguf)[:16]}..., its manifest and the model card record {good[:16]}...")
        assert "nothing was uploaded" in msg
        assert hub.requests == []
    finally:
        flip_middle(gguf, 64 << 10)
        os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256(gguf) == good
    rel.run_release(load_release(cfg), phases=["publish"], push=True, out_dir=out)
    stored = hub.stored("apex-orch/Demo-Integrity-APEX-GGUF")
    assert stored[gguf.name] == gguf.read_bytes()
    assert hub.ops()[-1] == "commit"


def test_card_is_not_rendered_for_changed_bytes(big_release, tmp_path):
    """Finding 1: `release --only card` after the tier file changed kept the card (and its old
    sha256) "up to date". Now the tier is not up to date, so the card phase refuses."""
    cfg, out = big_release
    copy = tmp_path / "release"
    shutil.copytree(out, copy)
    card_before = (copy / "README.md").read_bytes()
    flip_middle(copy / "Demo-Integrity-APEX-Compact.gguf", 64 << 10)
    r = cli("release", cfg, "--out-dir", copy, "--only", "card")
    assert_one_error(r.output, 4, r.exit_code, "card: no up-to-date output for tier(s) Compact")
    assert (copy / "README.md").read_bytes() == card_before


# ---------------------------------------------------------------------------- 2. inputs are never outputs

@pytest.fixture
def src_copy(tiny_moe, tmp_path) -> Path:
    p = tmp_path / "models" / "src.gguf"
    p.parent.mkdir()
    shutil.copyfile(tiny_moe, p)
    return p


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink in --out-dir"])
def test_quantize_refuses_an_output_that_is_its_source(how, src_copy, tmp_path, tripwire):
    """Finding 2: `-o src.gguf --force` replaced the F16 source with the Q4 file, and the error
    without --force recommended --force. Refused before anything runs, --force or not."""
    good = sha256(src_copy)
    if how == "same path":
        args, shown = ["-o", src_copy], src_copy
    elif how == "hard link":
        shown = tmp_path / "out" / "linked.gguf"
        shown.parent.mkdir()
        os.link(src_copy, shown)
        args = ["-o", shown]
    else:
        shown = plant_link(compact_output(tmp_path / "out"), src_copy)
        args = ["--out-dir", tmp_path / "out"]
    r = cli("quantize", "-p", "compact", src_copy, *args, "--force", "--no-eval")
    kind = "the same file through a hard link" if how == "hard link" else "the same file"
    assert_one_error(r.output, 2, r.exit_code, f"output {shown} is the input {src_copy} ({kind})",
                     "(asking to replace outputs does not change that)", "[--output, --out-dir, --name]")
    assert "pass --force" not in r.output
    assert sha256(src_copy) == good and not tripwire.exists()


def test_imatrix_refuses_an_output_that_is_its_model(src_copy):
    """Finding 2: `imatrix m.gguf -o m.gguf --force` replaced the model with a 22 KB imatrix."""
    good = sha256(src_copy)
    r = cli("imatrix", src_copy, "--corpus", "diverse", "--imatrix-ctx", "128", "--imatrix-chunks", "2", "-o",
            src_copy, "--force")
    assert_one_error(r.output, 2, r.exit_code, f"output {src_copy} is the input {src_copy} (the same file)")
    assert sha256(src_copy) == good


def test_release_refuses_a_source_inside_its_folder_under_a_tier_name(tiny_moe, tmp_path):
    """A release whose source sits in the release folder under a tier's file name: refused before
    the lock, the log or any phase (it used to reach quantize and say "pass --force")."""
    out = tmp_path / "release"
    out.mkdir()
    src = out / "Tiny-Release-APEX-Compact.gguf"
    shutil.copyfile(tiny_moe, src)
    cfg = tmp_path / "cfg" / "release.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"name: Tiny-Release\nlicense: mit\nsource:\n  gguf: {src}\ntiers: [compact]\n"
                   "eval: {enabled: false}\npublish: {repo: apex-orch/Tiny-Release-APEX-GGUF}\n")
    good = sha256(src)
    r = cli("release", cfg, "--out-dir", out, "-j", "1")
    assert_one_error(r.output, 2, r.exit_code, f"output {src} is the input {src} (the same file)")
    assert sorted(p.name for p in out.iterdir()) == [src.name] and sha256(src) == good


def test_compare_refuses_a_plot_over_its_base(src_copy, eval_text):
    """eval compare --plot BASE would have replaced the base with a PNG after the evaluation."""
    good = sha256(src_copy)
    r = cli("compare", src_copy, "--base", src_copy, "--text", eval_text, "-c", "128", "--chunks", "1",
            "--plot", src_copy, "--no-speed", "-q")
    assert_one_error(r.output, 2, r.exit_code, f"output {src_copy} is the input {src_copy} (the same file)")
    assert sha256(src_copy) == good


def test_eval_base_cache_that_is_the_base_is_refused(src_copy, eval_text):
    """A base log-prob cache entry that is a link to the base model (planted in the cache)."""
    from apex_orch.evaluation import base_cache as base_logprobs, evaluate as ev
    from apex_orch.evaluation.inputs import EvalSettings, model_facts, text_facts
    good = sha256(src_copy)
    base, text = model_facts(src_copy), text_facts(text=eval_text)
    entry = base_logprobs.cache_path(ev.base_cache_inputs(base, text, EvalSettings()))
    plant_link(entry, src_copy)
    with pytest.raises(OutputIsInputError, match="is the input"):
        ev.ensure_base_cache(base, text, EvalSettings())
    assert entry.is_symlink() and sha256(src_copy) == good


# ---------------------------------------------------------------------------- 3. no symlink is followed

@pytest.mark.parametrize("sidecar", [".log", ".lock", ".manifest.json", ""])
def test_quantize_never_writes_through_a_planted_link(sidecar, tiny_moe, tmp_path, victim, tripwire):
    """Finding 3: a `<out>.gguf.log` or `.lock` that is a link to a file elsewhere got that file
    overwritten (log) or truncated (lock). Every name a run writes is checked first: refused,
    nothing started, the file elsewhere unchanged. (.log and .lock failed before the fix.)"""
    out = tmp_path / "out"
    link = plant_link(out / (compact_output(out).name + sidecar), victim)
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", out, "--no-eval", "--force")
    assert_one_error(r.output, 17, r.exit_code, f"{link} is a symbolic link (to {victim})",
                     f"hint: remove the link (rm {link})")
    assert victim.read_text() == VICTIM_TEXT and not tripwire.exists()
    assert sorted(p.name for p in out.iterdir()) == [link.name]


@pytest.mark.parametrize("name", ["lock", "release.log"])
def test_release_never_writes_through_a_planted_link(name, tiny_moe, tmp_path, victim):
    """Finding 3: the release's .apex-release/lock was truncated, release.log appended to."""
    out = tmp_path / "release"
    link = plant_link(out / ".apex-release" / name, victim)
    cfg = tmp_path / "cfg" / "release.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"name: Tiny-Release\nlicense: mit\nsource:\n  gguf: {tiny_moe}\ntiers: [compact]\n"
                   "eval: {enabled: false}\npublish: {repo: apex-orch/Tiny-Release-APEX-GGUF}\n")
    r = cli("release", cfg, "--out-dir", out, "-j", "1")
    assert_one_error(r.output, 17, r.exit_code, f"{link} is a symbolic link (to {victim})")
    assert victim.read_text() == VICTIM_TEXT
    assert not list(out.glob("*.gguf")) and not (out / "README.md").exists()


def test_release_work_folder_that_is_a_link_is_refused(tiny_moe, tmp_path, victim):
    out = tmp_path / "release"
    link = plant_link(out / ".apex-release", victim.parent)
    cfg = tmp_path / "cfg" / "release.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"name: Tiny-Release\nlicense: mit\nsource:\n  gguf: {tiny_moe}\ntiers: [compact]\n"
                   "eval: {enabled: false}\npublish: {repo: apex-orch/Tiny-Release-APEX-GGUF}\n")
    r = cli("release", cfg, "--out-dir", out, "-j", "1")
    assert_one_error(r.output, 17, r.exit_code, f"{link} is a symbolic link (to {victim.parent})")
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]


@pytest.mark.parametrize("suffix", [".lock", ".log"])
def test_imatrix_cache_never_writes_through_a_planted_link(suffix, tiny_moe, victim):
    """Finding 3: the imatrix cache lock (`<cache>/imatrix/<key>.lock`) was truncated through a
    link; its log the same. Refused before llama-imatrix starts."""
    from apex_orch.calibration import imatrix as im
    plan = im.plan_imatrix(tiny_moe, "diverse", ctx=128, chunks=2)
    link = plant_link(plan.cache_path.with_suffix(suffix), victim)
    try:
        r = cli("imatrix", tiny_moe, "--corpus", "diverse", "--imatrix-ctx", "128", "--imatrix-chunks", "2")
        assert_one_error(r.output, 17, r.exit_code, f"{link} is a symbolic link (to {victim})")
        assert victim.read_text() == VICTIM_TEXT and not plan.cache_path.exists()
    finally:
        link.unlink()          # the module shares one cache


def test_in_place_writes_refuse_hard_links_and_fifos(tmp_path, victim):
    """The one helper: O_NOFOLLOW, then anything but a plain file with one name is refused before
    a byte is written or truncated (a hard link would truncate the file elsewhere)."""
    hard = tmp_path / "x.log"
    os.link(victim, hard)
    for mode in ("w", "a", "lock"):
        with pytest.raises(UnsafeOutputError, match=r"is a hard link \(2 names share this file\)"):
            safefiles.open_nofollow(hard, mode)
    fifo = tmp_path / "y.log"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeOutputError, match="is not a regular file"):
        safefiles.open_nofollow(fifo, "w")     # refused at once, never blocks waiting for a reader
    assert victim.read_text() == VICTIM_TEXT
    with safefiles.open_nofollow(tmp_path / "fresh.log", "w") as fh:
        fh.write("ok\n")
    assert (tmp_path / "fresh.log").read_text() == "ok\n"


# ---------------------------------------------------------------------------- 4. tier name collisions

def _profiles(tmp_path: Path, *tiers: str) -> list[Path]:
    out = []
    for i, tier in enumerate(tiers):
        p = tmp_path / "profiles" / f"p{i}.yaml"
        p.parent.mkdir(exist_ok=True)
        p.write_text(f"extends: compact\ntier: {tier!r}\n", encoding="utf-8")
        out.append(p)
    return out


@pytest.mark.parametrize("tiers,file_name", [(("A B", "A-B"), "Tiny-MoE-APEX-A-B.gguf"),
                                             (("Ä", "Ö"), "Tiny-MoE-APEX-tier.gguf")], ids=["space", "non-ascii"])
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_quantize_refuses_tiers_that_share_a_file(tiers, file_name, jobs, tiny_moe, tmp_path, tripwire):
    """Finding 4: both tiers printed "wrote X.gguf", one silently lost (with -j 2 the run blamed
    "another apex-orch run" holding its own lock). Refused up front, naming both tiers."""
    profiles = _profiles(tmp_path, *tiers)
    out = tmp_path / "out"
    r = cli("quantize", "-p", ",".join(map(str, profiles)), tiny_moe, "--out-dir", out, "-j", jobs, "--no-eval")
    assert_one_error(r.output, 2, r.exit_code,
                     f"tiers {tiers[0]!r} and {tiers[1]!r} both map to the file {file_name}")
    assert not out.exists() and not tripwire.exists()


def test_release_refuses_tiers_that_share_a_file(tiny_moe, tmp_path):
    profiles = _profiles(tmp_path, "A B", "A-B")
    cfg = tmp_path / "release.yaml"
    cfg.write_text(f"name: Tiny-Release\nlicense: mit\nsource:\n  gguf: {tiny_moe}\n"
                   f"tiers:\n  - {profiles[0]}\n  - {profiles[1]}\n"
                   "eval: {enabled: false}\npublish: {repo: apex-orch/Tiny-Release-APEX-GGUF}\n")
    before = snapshot(tmp_path)
    r = cli("release", cfg, "--out-dir", tmp_path / "release")
    assert_one_error(r.output, 3, r.exit_code, f"{cfg}:7:",
                     "tiers 'A B' and 'A-B' both map to the file Tiny-Release-APEX-A-B.gguf")
    assert snapshot(tmp_path) == before and not (tmp_path / "release").exists()
