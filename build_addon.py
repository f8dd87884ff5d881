"""Build the installable Blender extension: dist/pbnds_addon-<version>.zip.

Usage: python build_addon.py [--out DIR]. The zip holds addon/*.py and blender_manifest.toml at its
root (the layout `blender --command extension build` makes); install it with Blender 4.2+ through
Edit > Preferences > Get Extensions > Install from Disk.
"""

import argparse
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
            zf.write(file, file.name)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "dist", help="output folder (default: dist/)")
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
