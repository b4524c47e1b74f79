"""Build the pinned llama.cpp once, and install the bindings against it.

Run as `python -m apex_orch.llama.build [llama|bindings|all]` (what `make llama` does).
Standard library only: it runs before the package's dependencies exist. Every command (pip, cmake)
runs through the one runner (apex_orch.llama.tools.run_tool), its output in a log file; a failure
is a typed error (BuildError, with the log's tail) that `main` and `apex-orch build` print as one.

Steps, each skipped when its result is already in the cache:
1. download the llama-cpp-python sdist with pip and check its sha256 (apex_orch/llama/pin.py);
2. unpack it under the cache (the vendored llama.cpp is the pin);
3. configure and build the tools (Release, shared libs, no server/curl/TLS);
4. record build-info.json (llama.cpp version and commit, flags, targets);
5. link `vendor/llama.cpp` in the repo to the cached tree;
6. `bindings`: pip-install llama-cpp-python from the same sdist with -DLLAMA_BUILD=OFF,
   so it loads the libllama built in step 3 (apex_orch sets LLAMA_CPP_LIB_PATH).
   If that fails, fall back to a normal compiled install and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from apex_orch.core import settings
from apex_orch.core.errors import ApexError, BuildError, RequestError, ToolFailedError, ToolNotFoundError
from apex_orch.core.fingerprint import sha256_file
from apex_orch.llama import pin
from apex_orch.llama.tools import capture_tool, run_tool

REPO_ROOT = settings.PACKAGE_DIR.parent


# Progress lines go to stderr (stdout is for results); `apex-orch build -q` silences them for one build.
_QUIET: list[bool] = [False]


def log(msg: str) -> None:
    if not _QUIET[-1]:
        print(f"[apex-orch build] {msg}", file=sys.stderr, flush=True)


def run(args: list[str], *, log_file: Path, env: dict | None = None) -> None:
    """Run one build step, its output in `log_file`; a failure is a BuildError with the log's tail."""
    what = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(args[:3]))
    try:
        run_tool(args, log_path=log_file, env=env, tail_lines=40, what=what)
    except ToolNotFoundError as exc:
        raise BuildError(exc.message, hint="building llama.cpp needs cmake, a C/C++ compiler and pip") from None
    except ToolFailedError as exc:
        if isinstance(exc, BuildError):
            raise
        raise BuildError(exc.message, returncode=exc.returncode, log_path=exc.log_path, log_tail=exc.log_tail,
                         hint=f"the log says why; the build's logs are under {pin.pin_dir()}") from None


def sdist_path() -> Path:
    return settings.cache_root() / "downloads" / pin.SDIST_NAME


def fetch_sdist() -> Path:
    target = sdist_path()
    if target.exists() and sha256_file(target) == pin.SDIST_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {pin.SDIST_NAME} from the package index")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # pip prepares the sdist's metadata even for `download`; with build isolation it fetches
        # scikit-build-core into a throwaway env itself, so nothing has to be installed first
        # (with --no-build-isolation a fresh venv fails: "Cannot import build backend").
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             f"llama-cpp-python=={pin.LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
            log_file=target.parent / "pip-download.log")
        got = Path(tmp) / pin.SDIST_NAME
        if not got.exists():
            raise BuildError(f"pip did not produce {pin.SDIST_NAME} in {tmp}",
                             log_path=target.parent / "pip-download.log")
        digest = sha256_file(got)
        if digest != pin.SDIST_SHA256:
            raise BuildError(f"sha256 of {pin.SDIST_NAME} is {digest}, pinned {pin.SDIST_SHA256}; "
                             "refusing to build an unpinned llama.cpp",
                             hint="the package index served other bytes than the pin; check which index pip uses")
        os.replace(got, target)
    return target


def unpack(sdist: Path) -> Path:
    tree = pin.sdist_tree()
    marker = pin.pin_dir() / ".unpacked"
    if marker.exists() and pin.llama_source().is_dir():
        return tree
    log(f"unpacking into {pin.pin_dir()}")
    pin.pin_dir().mkdir(parents=True, exist_ok=True)
    if tree.exists():
        shutil.rmtree(tree)
    with tarfile.open(sdist) as tf:
        tf.extractall(pin.pin_dir(), filter="data")
    marker.write_text(pin.SDIST_SHA256 + "\n")
    return tree


def llama_version(src: Path) -> dict:
    """The llama.cpp build number/commit as far as the sdist records them."""
    info: dict = {"llama_cpp_python": pin.LLAMA_CPP_PYTHON_VERSION, "sdist_sha256": pin.SDIST_SHA256}
    # The sdist carries no .git; llama-cpp-python's CHANGELOG names the vendored commit.
    changelog = (pin.sdist_tree() / "CHANGELOG.md").read_text(errors="replace")
    section = changelog.split(f"## [{pin.LLAMA_CPP_PYTHON_VERSION}]", 1)[-1].split("\n## [", 1)[0]
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    found = m.group(1) if m else None
    if found != pin.LLAMA_CPP_COMMIT:
        raise BuildError(f"the sdist's CHANGELOG names llama.cpp@{found}, apex_orch/llama/pin.py says "
                         f"{pin.LLAMA_CPP_COMMIT}", hint="update LLAMA_CPP_COMMIT together with the pin")
    info["commit"] = found
    return info


def build_tools(extra_args: tuple[str, ...] = ()) -> dict:
    """Configure and build the tools; `extra_args` (e.g. -DGGML_CUDA=ON) select their own
    build folder (pin.variant_key), are recorded in build-info.json, and become the active build."""
    src = pin.llama_source()
    bdir = pin.build_dir(extra_args)
    info_path = pin.build_info_path(extra_args)
    wanted = {"flags": list(pin.CMAKE_FLAGS), "extra_flags": list(extra_args), "targets": list(pin.TOOL_TARGETS)}
    bins = bdir / "bin"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if all(info.get(k) == v for k, v in wanted.items()) and all(
                (bins / t).exists() for t in pin.TOOL_TARGETS):
            log(f"cached build is current: {bins}" + (f" (extra flags: {' '.join(extra_args)})" if extra_args else ""))
            _activate(bdir)
            return info
    jobs = str(os.cpu_count() or 2)
    start = time.monotonic()
    log(f"configuring llama.cpp ({src})" + (f" with extra flags: {' '.join(extra_args)}" if extra_args else ""))
    bdir.mkdir(parents=True, exist_ok=True)
    run(["cmake", "-S", str(src), "-B", str(bdir), *pin.CMAKE_FLAGS, *extra_args], log_file=bdir / "configure.log")
    log(f"building {', '.join(pin.TOOL_TARGETS)} with {jobs} jobs (a few minutes on 2 cores)")
    run(["cmake", "--build", str(bdir), "-j", jobs, "--target", *pin.TOOL_TARGETS],
        log_file=bdir / "build.log")
    info = {**wanted, **llama_version(src), "build_key": pin.variant_key(extra_args), "bin_dir": str(bins),
            "build_seconds": round(time.monotonic() - start, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    _activate(bdir)
    log(f"built in {info['build_seconds']} s")
    return info


def _activate(bdir: Path) -> None:
    """Record which build variant apex-orch uses from now on (atomic: a reader never sees half)."""
    target = pin.active_build_file()
    try:
        if target.read_text().strip() == bdir.name:
            return   # already the active build: a rerun of `make llama` writes nothing
    except OSError:
        pass
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(bdir.name + "\n")
    os.replace(tmp, target)


def link_vendor() -> None:
    """`vendor/llama.cpp` in the checkout points at the cached, pinned tree (a wheel install
    has no checkout: nothing is linked next to site-packages)."""
    if not pin.in_source_checkout():
        return
    vendor = REPO_ROOT / "vendor" / "llama.cpp"
    vendor.parent.mkdir(exist_ok=True)
    if vendor.is_symlink() or vendor.exists():
        if vendor.is_symlink() and vendor.resolve() == pin.llama_source().resolve():
            return
        if vendor.is_symlink() or vendor.is_file():
            vendor.unlink()
        else:
            shutil.rmtree(vendor)
    vendor.symlink_to(pin.llama_source())


def bindings_installed() -> bool:
    probe = capture_tool([sys.executable, "-m", "pip", "show", "llama-cpp-python"], timeout=300, what="pip show")
    return probe.returncode == 0 and f"Version: {pin.LLAMA_CPP_PYTHON_VERSION}" in probe.stdout


def install_bindings() -> None:
    if bindings_installed():
        log("llama-cpp-python bindings already installed")
        return
    sdist = fetch_sdist()
    logs = pin.pin_dir()
    log("installing build helpers for the bindings")
    run([sys.executable, "-m", "pip", "install", "scikit-build-core[pyproject]>=0.9.2", "numpy",
         "typing-extensions>=4.5.0", "diskcache>=5.6.1", "jinja2>=2.11.3"], log_file=logs / "pip-deps.log")
    env = settings.child_environment(CMAKE_ARGS="-DLLAMA_BUILD=OFF")
    log("installing llama-cpp-python against the shared libllama (no second compile)")
    try:
        run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", str(sdist)],
            log_file=logs / "pip-bindings.log", env=env)
    except BuildError as exc:
        log(f"WARNING: reuse install failed ({exc.message}; log: {exc.log_path}); falling back to a normal "
            "compiled install (a second llama.cpp compile, several minutes)")
        run([sys.executable, "-m", "pip", "install", "--no-deps", str(sdist)],
            log_file=logs / "pip-bindings-fallback.log")
        (pin.pin_dir() / "bindings-fallback").write_text("compiled install\n")


def extra_cmake_args_from_env() -> tuple[str, ...]:
    """LLAMA_CMAKE_ARGS, checked: `make llama LLAMA_CMAKE_ARGS=...` passes the user's flags this way."""
    try:
        return pin.parse_extra_cmake_args(settings.llama_cmake_args())
    except ValueError as exc:
        raise RequestError(str(exc), where="LLAMA_CMAKE_ARGS",
                           hint="give flags as -DNAME=VALUE, e.g. LLAMA_CMAKE_ARGS=-DGGML_CUDA=ON") from None


TARGETS = ("llama", "bindings", "all")


def build(what: str = "all", extra_args: tuple[str, ...] = (), *, quiet: bool = False) -> None:
    """The one set-up path: `make llama`/`make bindings` and `apex-orch build` all call this
    (`quiet`: no progress lines)."""
    if what not in TARGETS:
        raise RequestError(f"unknown build target {what!r}; one of {', '.join(TARGETS)}", fields=("what",))
    _QUIET.append(quiet)
    try:
        if what in ("llama", "all"):
            unpack(fetch_sdist())
            build_tools(extra_args)
            link_vendor()
        if what in ("bindings", "all"):
            install_bindings()
    finally:
        _QUIET.pop()


def main(argv: list[str]) -> int:
    """`python -m apex_orch.llama.build [llama|bindings|all]`: the error, if any, as one message."""
    if len(argv) > 1 or (argv and argv[0] not in TARGETS):
        print("usage: python -m apex_orch.llama.build [llama|bindings|all]", file=sys.stderr)
        return 2
    try:
        build(argv[0] if argv else "all", extra_cmake_args_from_env())
    except ApexError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
