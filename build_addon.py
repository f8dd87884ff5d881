"""Build the installable Blender extension: dist/pbnds_addon-<version>.zip.

Usage: python build_addon.py [--out DIR]. The zip holds one folder, pbnds/, with addon/*.py and
blender_manifest.toml. Both install paths of Blender 4.2+ take it: Get Extensions > Install from Disk
reads the manifest (the extension `bl_ext.user_default.pbnds`); the legacy Add-ons > Install
extracts the folder as the add-on `pbnds` and reads the `bl_info` written into its __init__.py here,
from the manifest (extensions ignore it). Blenders older than the manifest's minimum refuse it,
naming the version it needs.
"""

import argparse
import ast
import pathlib
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent
ADDON = ROOT / "addon"
REQUIRED = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type",
            "blender_version_min", "license")


def read_manifest():
    manifest = tomllib.loads((ADDON / "blender_manifest.toml").read_text())
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise SystemExit(f"addon/blender_manifest.toml lacks {', '.join(missing)}")
    return manifest


def build(out_dir=ROOT / "dist"):
    """Write the zip and return its path."""
    manifest = read_manifest()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"pbnds_addon-{manifest['version']}.zip"
    files = sorted(ADDON.glob("*.py")) + [ADDON / "blender_manifest.toml"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in files:
            name = f"{manifest['id']}/{file.name}"
            if file.name == "__init__.py":
                zf.writestr(name, with_bl_info(file.read_text(), manifest))
            else:
                zf.write(file, name)
    return path


def with_bl_info(source, manifest):
    """``source`` (the add-on's __init__.py) with the legacy ``bl_info`` from ``manifest`` after its docstring.

    Blender reads ``bl_info`` without importing: from its line to the next blank one.
    """
    bl_info = {"name": manifest["name"], "author": manifest["maintainer"], "version": _numbers(manifest["version"]),
               "blender": _numbers(manifest["blender_version_min"]), "description": manifest["tagline"],
               "category": manifest["tags"][0]}
    body = ast.parse(source).body
    docstring = body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    lines = source.splitlines(keepends=True)
    end = body[0].end_lineno if docstring else 0
    return "".join(lines[:end]) + f"\nbl_info = {bl_info!r}\n\n" + "".join(lines[end:]).lstrip("\n")


def _numbers(version):
    return tuple(int(part) for part in version.split("."))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "dist", help="output folder (default: dist/)")
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
