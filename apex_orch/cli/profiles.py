"""`apex-orch profile list|show|import`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from apex_orch.cli.options import json_option
from apex_orch.core.errors import ProfileError
from apex_orch.core.outputs import check_new_output, write_output
from apex_orch.plan.profile_import import check_importable, dump_profile, import_tensor_type_file
from apex_orch.plan.profile_search import profile_search_path, profile_sources, source_of
from apex_orch.plan.profiles import load_profile


@click.group()
def profile() -> None:
    """List, show and import APEX profiles (profiles/*.yaml)."""


@profile.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """List profiles with their tier, base type, imatrix need and where each comes from
    (built-in, or a folder from --profiles-dir / $APEX_ORCH_PROFILES)."""
    sources = profile_sources()
    if not sources:
        searched = ", ".join(f"{folder} ({label.split()[0]})" for label, folder in profile_search_path())
        raise ProfileError(f"no profiles found; searched: {searched}",
                           hint="reinstall apex-orch (the built-in profiles ship with it), or point "
                                "--profiles-dir / APEX_ORCH_PROFILES at a folder of NAME.yaml files")
    if as_json:
        rows = []
        for src in sources:
            p = load_profile(src.path)
            rows.append({"name": src.name, "tier": p.tier, "base_ftype": p.base_ftype,
                         "imatrix_required": p.imatrix_required, "corpus": p.corpus, "best_for": p.best_for,
                         "source": src.source, "shadows_builtin": src.shadows_builtin, "path": str(src.path),
                         "chain": [_link(q) for q in p.chain_paths]})
        click.echo(json.dumps(rows, indent=2))
        return
    for src in sources:
        p = load_profile(src.path)
        im = f"imatrix ({p.corpus or 'any'})" if p.imatrix_required else "no imatrix"
        origin = src.source + (" (shadows the built-in)" if src.shadows_builtin else "")
        origin += "".join(f"; {link}" for link in _shadowing_links(p))
        click.echo(f"{src.name:<12} {p.tier:<11} base {p.base_ftype:<7} {im:<20} {p.best_for}  [{origin}]")


def _shadowing_links(p) -> list[str]:
    """The links of a profile's extends chain (after its own file) that do not come from the built-ins:
    a user `_apex.yaml` changes every built-in profile that extends it, and `profile list` says so."""
    out = []
    for path in p.chain_paths[1:]:
        label, shadows = source_of(path)
        if label != "built-in":
            out.append(f"extends {path.stem} from {label if label != 'file' else path}"
                       + (" (shadows the built-in)" if shadows else ""))
    return out


def _link(path: Path) -> dict:
    """One link of a profile's extends chain: its file and where it comes from."""
    label, shadows = source_of(path)
    return {"path": str(path), "source": label, "shadows_builtin": shadows}


def _chain_text(p) -> str:
    links = []
    for path in p.chain_paths:
        label, shadows = source_of(path)
        where = label if label != "file" else str(path)
        links.append(f"{path.stem} [{where}{', shadows the built-in' if shadows else ''}]")
    return " <- ".join(links)


@profile.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved profile as JSON.")
def show(name: str, as_json: bool) -> None:
    """Show a profile (a name or a .yaml path) after `extends` is resolved."""
    p = load_profile(name)
    if as_json:
        click.echo(json.dumps({"name": p.name, "tier": p.tier, "sha256": p.sha256, "chain": p.chain,
                               "chain_sources": [_link(q) for q in p.chain_paths],
                               **p.raw}, indent=2, default=str))
        return
    click.echo(f"profile    {p.name}  (from {p.path})")
    click.echo(f"chain      {_chain_text(p)}")
    click.echo(f"tier       {p.tier}   best for: {p.best_for}")
    imatrix = 'required, corpus ' + str(p.corpus) if p.imatrix_required else 'not required'
    click.echo(f"base       {p.base_ftype}   imatrix: {imatrix}")
    b = p.bands
    click.echo(f"bands      edge {b.edge}, near {b.near}, attention edge {b.attention_edge} (scale: {b.scale}, "
               f"reference {b.reference_blocks} blocks)")
    for role, bands in p.types.items():
        click.echo(f"  {role:<14} " + ", ".join(f"{band}={t.name}" for band, t in bands.items()))
    click.echo(f"  {'nextn':<14} {p.nextn if isinstance(p.nextn, str) else p.nextn.name}")
    for o in p.overrides:
        sel = f"band {o.band}" if o.band else f"blocks {sorted(o.blocks)}" if o.blocks else "all blocks"
        click.echo(f"  override     {o.role}{'.' + o.slot if o.slot else ''} {sel} -> {o.type.name}")
    if p.gates:
        click.echo("gates      " + ", ".join(f"{k}={v}" for k, v in p.gates.items()))
    click.echo(f"sha256     {p.sha256}")


@profile.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the YAML here (default: stdout).")
@click.option("--model", type=click.Path(dir_okay=False), help="Use this model's tensor names as the universe.")
@click.option("--blocks", type=int, default=36, show_default=True,
              help="Blocks of the canonical layout (without --model).")
@click.option("--base-ftype", default="Q4_K_M", show_default=True, help="llama-quantize FTYPE the file was used with.")
@click.option("--tier", default=None, help="Tier name for the new profile.")
@click.option("--force", is_flag=True, help="Replace an existing --output (never the input itself).")
@json_option
def import_cmd(file: str, output: str | None, model: str | None, blocks: int, base_ftype: str,
               tier: str | None, force: bool, as_json: bool) -> None:
    """Turn an upstream apex-quant tensor-type file (PATTERN=TYPE lines) into a YAML profile,
    and report the lines it did not understand."""
    out = None
    if output:   # before anything is read: never an input (--force or not), no overwrite without --force
        out = check_new_output(output, inputs=[Path(file), Path(model) if model else None], force=force)
    info = names = None
    if model:
        from apex_orch.model.info import read_model
        info = read_model(model)
        names = [t.name for t in info.tensors]
    rep = import_tensor_type_file(Path(file), names=names, n_blocks=blocks, base_ftype=base_ftype, tier=tier)
    check_importable(rep.profile, Path(file), info)
    text = dump_profile(rep.profile)
    if out is not None:
        write_output(out, text, force=force)
    problems = (("not understood", rep.not_understood), ("substring accidents", rep.accidental),
                ("matched nothing", rep.unused))
    if as_json:
        click.echo(json.dumps({"profile": rep.profile, "yaml": text, "output": str(out) if out else None,
                               "not_understood": list(rep.not_understood), "accidental": list(rep.accidental),
                               "unused": list(rep.unused)}, indent=2, default=str))
    elif out is not None:
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)
    for title, items in problems:
        for item in items:
            click.echo(f"warning: {title}: {item}", err=True)
