"""What `pip install disagfusion[...]` gives each role: the wheel's contents, and an
operator install without torch that runs the operator's and the planner's commands."""

from __future__ import annotations

import email
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("worker", "operator", "proto", "scheduling")
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("disagfusion-*.whl")
    return built


def _sources() -> set[str]:
    """Every module the package should ship, as its path inside the wheel: the package
    root's own files, and the top-level rooms its links point at."""
    root = REPO / "disagfusion"
    names = set()
    for entry in root.iterdir():
        if entry.is_symlink():
            continue  # a room: counted from its real folder below
        files = entry.rglob("*.py") if entry.is_dir() else [entry]
        names |= {f"disagfusion/{p.relative_to(root)}" for p in files if p.suffix == ".py"}
    for room in ROOMS:
        names |= {f"disagfusion/{p.relative_to(REPO)}" for p in (REPO / room).rglob("*.py")}
    return names


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_nothing_else(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {n for n in names if n.endswith(".py")}
    missing = _sources() - modules
    assert not missing, sorted(missing)
    assert not {n for n in modules if n.startswith(("tests/", "e2e/", "tools/"))}
    assert {"disagfusion/proto/disagfusion.proto", "disagfusion/proto/disagfusion_pb2.pyi"} <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "disagfusion = disagfusion.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.slow
def test_each_role_pulls_only_what_it_runs(wheel: Path) -> None:
    meta_name = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(meta_name))
    requires = meta.get_all("Requires-Dist") or []
    base = {r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert base == {"grpcio", "protobuf", "prometheus-client", "pyyaml", "numpy"}
    by_extra: dict[str, set[str]] = {}
    for r in requires:
        if "extra ==" in r:
            name, extra = r.split(";")[0], r.split("extra ==")[1].strip().strip("'\"")
            by_extra.setdefault(extra, set()).add(name.split(">")[0].split("[")[0].strip())
    assert "torch" in by_extra["worker"] and "torch" not in by_extra["operator"]
    assert by_extra["operator"] == {"kopf", "kubernetes"}
    assert by_extra["plot"] == {"matplotlib"}
    assert set(meta.get_all("Provides-Extra") or []) >= {"worker", "operator", "plot", "all"}


@pytest.fixture(scope="module")
def operator_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("operator-venv")
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{wheel}[operator]"],
        check=True,
        capture_output=True,
    )
    yield root / "bin"


def _run(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "disagfusion"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=bin_dir,  # not the repository: the installed package alone
    )


@pytest.mark.slow
def test_the_operator_install_has_no_torch_and_runs_its_commands(operator_venv: Path) -> None:
    torch = subprocess.run(
        [str(operator_venv / "python"), "-c", "import torch"], capture_output=True, text=True
    )
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    assert _run(operator_venv, "operator", "--help").returncode == 0
    plan = _run(operator_venv, "plan", "--profile", "builtin:qwen-image-h100", "--gpus", "64")
    assert plan.returncode == 0 and "denoiser" in plan.stdout, plan.stderr
    simulate = _run(
        operator_venv,
        "simulate",
        "--trace",
        "builtin:steady",
        "--profile",
        "builtin:qwen-image-h100",
        "--policy",
        "hybrid",
        "--requests",
        "200",
        "--json",
    )
    assert simulate.returncode == 0 and '"hybrid"' in simulate.stdout, simulate.stderr


@pytest.mark.slow
def test_a_command_whose_extra_is_missing_names_the_extra(operator_venv: Path) -> None:
    serve = _run(operator_venv, "serve", "--local", "--port", "1")
    assert serve.returncode == 2
    assert "pip install 'disagfusion[worker]'" in serve.stderr and "Traceback" not in serve.stderr


def test_both_images_copy_every_room_the_package_links_to() -> None:
    rooms = sorted(p.name for p in (REPO / "disagfusion").iterdir() if p.is_symlink())
    assert rooms == sorted(ROOMS)
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    for room in rooms:
        assert f"!{room}" in allowed, room
        for image in ("worker", "operator"):
            dockerfile = (REPO / image / "Dockerfile").read_text()
            assert f"COPY {room} ./{room}" in dockerfile, (image, room)
    assert "'.[operator]'" in (REPO / "operator" / "Dockerfile").read_text()
    assert "'.[worker]'" in (REPO / "worker" / "Dockerfile").read_text()
