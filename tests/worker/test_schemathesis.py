"""schemathesis (`st run`, a subprocess) against a live `serve --local` with a tiny
model: every operation in its /openapi.json, the coverage and fuzzing phases, every
check (no 5xx, status codes, content types, headers and bodies as documented, valid
data accepted, invalid data rejected, the API key enforced). Afterwards every
process of the deployment is still alive and a generation still works.

Deterministic (seed 1) and bounded: 30 examples per operation, 15 requests a second
(under the gateway's default rate limit). tests/worker/schemathesis_hooks.py makes
valid image and video requests cheap before they are sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.serve_local import ServeLocal, is_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
ST = Path(sys.executable).with_name("st")
KEY = "sk-schemathesis"
# A list cursor or a content variant that names nothing of yours is a 400 the schema
# cannot foresee (it depends on the jobs that exist).
VIDEO_CONFIG = """
[[operations]]
include-operation-id = ["listVideos", "downloadVideoContent"]
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "400", "401", "404", "409", "410", "429",
]

[[operations]]
include-operation-id = "createVideo"
phases.coverage.enabled = false  # ~1000 boundary cases: the fuzzing phase samples them
"""


def run_schemathesis(url: str, tmp_path: Path, *extra: str, config: str = "") -> str:
    config_file = tmp_path / "schemathesis.toml"
    config_file.write_text(config)
    argv = [str(ST), "--config-file", str(config_file), "run", f"{url}/openapi.json"]
    argv += ["--checks", "all", "--phases", "coverage,fuzzing", "--max-examples", "30"]
    argv += ["--seed", "1", "--workers", "1", "--rate-limit", "15/s", "--request-timeout", "60"]
    argv += ["--generation-database", "none", "--no-color", *extra]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.worker.schemathesis_hooks",
        "PYTHONPATH": str(REPO),
    }
    # Run where its cache (.schemathesis/) may go: not in the repository.
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "No issues found" in output, output
    return output


def assert_all_alive(server: ServeLocal, before: list[int]) -> None:
    assert server.proc.poll() is None, server.output()
    after = {p.pid for p in server.children()}
    assert set(before) <= after, f"workers gone: {set(before) - after}\n{server.output()}"
    assert is_ready(server.url)


def post_json(url: str, body: dict[str, object], key: str | None = None) -> dict[str, object]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
        answer: dict[str, object] = json.loads(resp.read())
        return answer


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeLocal]:
    logs = tmp_path_factory.mktemp("serve-images")
    with ServeLocal(logs, env={"DISAGFUSION_API_KEY": KEY}) as server:
        server.wait_serving()
        yield server


def test_the_images_api_holds_up_to_schemathesis(image_server: ServeLocal, tmp_path: Path) -> None:
    children = image_server.children()
    assert sorted(p.role for p in children) == ["decoder", "denoiser", "encoder", "gateway"]
    before = [p.pid for p in children]
    output = run_schemathesis(image_server.url, tmp_path, "-H", f"Authorization: Bearer {KEY}")
    assert "POST /v1/images/generations" in output or "3 selected" in output
    assert_all_alive(image_server, before)
    result = post_json(
        image_server.url + "/v1/images/generations", {"prompt": "a fox", "size": "64x64"}, KEY
    )
    assert isinstance(result["data"], list) and len(result["data"]) == 1


def test_the_videos_api_holds_up_to_schemathesis(tmp_path: Path) -> None:
    args = ["--model", "builtin:tiny-wan", "--data-dir", str(tmp_path / "jobs")]
    with ServeLocal(tmp_path / "logs", *args) as server:
        server.wait_serving()
        before = [p.pid for p in server.children()]
        output = run_schemathesis(server.url, tmp_path, config=VIDEO_CONFIG)
        assert "7 selected" in output
        assert_all_alive(server, before)
        job = post_json(server.url + "/v1/videos", {"prompt": "a fox", "num_frames": 5})
        assert job["status"] == "queued"
