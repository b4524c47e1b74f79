"""Where profiles come from: the built-ins, the user's folders, and a name's lookup.

Takes: the global --profiles-dir options (held here for one command by `profile_dirs_option`,
never exported through the environment) and $APEX_ORCH_PROFILES (apex_orch.core.settings).
Gives: the search path, in layers (the --profiles-dir folders in the order given, then
$APEX_ORCH_PROFILES's, then the built-ins; a name is the first layer's file of that name, and
`extends:` of a file's own name reaches the next layer down), `resolve_profile_path` (a name or a
.yaml path to a file), where a file comes from (`source_of`) and the listing `apex-orch profile
list` shows (`profile_sources`).

Apart from apex_orch.plan.profiles (the schema and its validation) so that finding a profile
needs neither YAML nor gguf, and one place decides which file a name means.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from apex_orch.core import settings
from apex_orch.core.errors import ProfileError

PROFILE_NAME_RE = re.compile(r"^_?[a-z0-9][a-z0-9_-]{0,63}$")


def builtin_profiles_dir() -> Path:
    """The built-in profiles: the checkout's top-level `profiles/` (where users edit them), or,
    in a wheel install, the same files packaged as `apex_orch/profiles/` (pyproject's package-dir)."""
    packaged = settings.PACKAGE_DIR / "profiles"
    return packaged if packaged.is_dir() else settings.PACKAGE_DIR.parent / "profiles"


# The global --profiles-dir options of the command being run (a module value, like
# apex_orch.llama.tools' --llama-bin-dir: worker threads look profiles up too).
_profile_dirs_option: tuple[Path, ...] = ()


@contextmanager
def profile_dirs_option(folders: Sequence[Path]) -> Iterator[None]:
    """Search `folders` (the --profiles-dir options) first while the block runs; the previous
    value comes back afterwards, so in-process callers (tests, embedding programs) see no leftover."""
    global _profile_dirs_option
    previous, _profile_dirs_option = _profile_dirs_option, tuple(folders)
    try:
        yield
    finally:
        _profile_dirs_option = previous


def user_profile_dirs() -> list[Path]:
    """The user's own profile folders: the --profiles-dir options, then $APEX_ORCH_PROFILES
    (settings.user_profile_dirs). They add to the built-ins and are searched first."""
    return [*_profile_dirs_option, *settings.user_profile_dirs()]


def profile_search_path() -> list[tuple[str, Path]]:
    """(source label, folder) in lookup order, the layers: the --profiles-dir folders in the order
    given, then $APEX_ORCH_PROFILES's in its order, then the built-ins. A name is the first layer's
    file of that name. A folder of $APEX_ORCH_PROFILES that does not exist is an error, as it is for
    --profiles-dir (checked when the option is parsed): a typo never silently drops a layer."""
    for d in settings.user_profile_dirs():
        if not d.is_dir():
            raise ProfileError(f"APEX_ORCH_PROFILES names {d}, which is not a folder",
                               hint="fix the variable (folders separated by " + repr(os.pathsep) + "), or unset it")
    return [*((f"user {d}", d) for d in user_profile_dirs()), ("built-in", builtin_profiles_dir())]


def _layer_of(path: Path, layers: list[tuple[str, Path]]) -> int | None:
    """The index of the layer whose folder holds `path` (None: a file outside every layer)."""
    parent = os.path.realpath(path.parent)
    for i, (_label, folder) in enumerate(layers):
        if os.path.realpath(folder) == parent:
            return i
    return None


def resolve_profile_path(name_or_path: str, base_dir: Path | None = None, skip: Path | None = None) -> Path:
    """A profile name (looked up in the layers, first one wins) or a path ending in .yaml/.yml.

    `skip` is the profile asking (for `extends`). `extends:` of the asking file's own name reaches
    the next layer down, never the asking layer or one above it (a user's compact.yaml may extend
    the built-in compact; two user folders may each extend `compact` and stack): so a chain can only
    go down the layers and same-name extends never loop."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")):
        p = Path(text)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.exists():
            raise ProfileError("profile file not found", where=str(p),
                               hint="check the path, or give a profile name (`apex-orch profile list`)")
        return p
    if not PROFILE_NAME_RE.match(text):
        raise ProfileError(
            f"{text!r} is not a profile name (names use a-z, 0-9, '-' and '_', no path separators or '..')",
            hint="give a name from `apex-orch profile list`, or a file path ending in .yaml")
    layers = profile_search_path()
    start = 0
    skip_resolved = os.path.realpath(skip) if skip is not None else None
    if skip is not None and skip.stem == text:
        own = _layer_of(skip, layers)
        if own is not None:
            start = own + 1    # the next layer down
    for _source, folder in layers[start:]:
        p = folder / f"{text}.yaml"
        if p.is_file() and os.path.realpath(p) != skip_resolved:
            return p
    if start:
        raise ProfileError(f"extends: {text!r} names its own file's name, and no layer below "
                           f"{layers[start - 1][1]} has a profile of that name",
                           hint="layers: " + " > ".join(str(f) for _l, f in layers) + "; extend a profile of "
                                "another name, or drop extends")
    known = ", ".join(list_profiles()) or "(none)"
    raise ProfileError(f"unknown profile {text!r}", hint=f"known profiles: {known}; or pass a .yaml path")


def source_of(path: Path) -> tuple[str, bool]:
    """(where a profile file comes from: "built-in", "user <folder>" or "file", whether it shadows a
    built-in of the same name) — how `profile list` and `show` label every link of a chain."""
    layers = profile_search_path()
    i = _layer_of(Path(path), layers)
    label = layers[i][0] if i is not None else "file"
    builtin = builtin_profiles_dir() / Path(path).name
    shadows = label != "built-in" and builtin.is_file() and os.path.realpath(builtin) != os.path.realpath(path)
    return label, shadows


@dataclass(frozen=True)
class ProfileSource:
    name: str
    path: Path
    source: str            # "built-in" or "user <folder>"
    shadows_builtin: bool  # a user profile with a built-in's name wins the lookup


def profile_sources() -> list[ProfileSource]:
    """Every listable profile (not `_`-prefixed bases) with where it comes from, by name."""
    found: dict[str, ProfileSource] = {}
    builtin_names: set[str] = set()
    for source, folder in profile_search_path():
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("*.yaml")):
            if p.stem.startswith("_") or not p.is_file():
                continue
            if source == "built-in":
                builtin_names.add(p.stem)
            found.setdefault(p.stem, ProfileSource(p.stem, p, source, False))
    return [ProfileSource(s.name, s.path, s.source, s.source != "built-in" and s.name in builtin_names)
            for s in sorted(found.values(), key=lambda s: s.name)]


def list_profiles() -> list[str]:
    return [s.name for s in profile_sources()]
