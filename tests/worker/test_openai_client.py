"""The official `openai` client and `disagfusion generate` against `serve --local`,
started the way the README starts it, with an API key on the gateway."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tests.worker.serve_local import ServeLocal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
KEY = "sk-local-test"
SERVED = "my-diffusion"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeLocal]:
    log_dir = tmp_path_factory.mktemp("serve")
    with ServeLocal(
        log_dir,
        "--model",
        "builtin:tiny-unet",
        "--served-model-name",
        SERVED,
        env={"DISAGFUSION_API_KEY": KEY},
    ) as s:
        s.wait_serving()
        yield s


@pytest.fixture
def client(server: ServeLocal) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _image(b64: str | None) -> np.ndarray:
    assert b64
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.mark.parametrize("model", ["builtin:tiny-unet", "tiny-unet", SERVED, None])
def test_the_model_may_be_named_as_the_server_was_started(
    client: openai.OpenAI, model: str | None
) -> None:
    extra = {"model": model} if model else {}
    result = client.images.generate(prompt="a red fox", size="64x64", **extra)  # type: ignore[call-overload]
    assert result.data and _image(result.data[0].b64_json).shape == (64, 64, 3)


def test_another_model_is_a_404_naming_what_is_served(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(model="dall-e-3", prompt="a red fox", size="64x64")
    assert SERVED in str(err.value)


def test_models_are_listed_and_retrieved_under_the_served_name(client: openai.OpenAI) -> None:
    listed = client.models.list().data
    assert [m.id for m in listed] == [SERVED]
    assert listed[0].created > 0
    assert client.models.retrieve("builtin:tiny-unet").id == SERVED
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_a_wrong_key_is_refused(server: ServeLocal) -> None:
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="a red fox", size="64x64")


def test_each_image_reports_the_seed_that_reproduces_it(client: openai.OpenAI) -> None:
    batch = client.images.generate(prompt="a red fox", size="64x64", n=2, extra_body={"seed": 5})
    seeds = [item.model_extra["seed"] for item in batch.data or [] if item.model_extra]
    assert seeds == [5, 6]
    alone = client.images.generate(prompt="a red fox", size="64x64", extra_body={"seed": 6})
    second, single = _image(batch.data[1].b64_json), _image(alone.data[0].b64_json)  # type: ignore[index]
    assert np.abs(second.astype(int) - single.astype(int)).max() <= 1
    assert np.abs(_image(batch.data[0].b64_json).astype(int) - single.astype(int)).max() > 1  # type: ignore[index]


def _generate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "disagfusion", "generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.endswith("API_KEY")} | env,
    )


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        (["--api-key", KEY], {}),
        ([], {"DISAGFUSION_API_KEY": KEY}),
        ([], {"OPENAI_API_KEY": KEY}),
    ],
    ids=["flag", "disagfusion-env", "openai-env"],
)
def test_generate_sends_the_key_and_accepts_a_v1_base_url(
    server: ServeLocal, tmp_path: Path, flags: list[str], env: dict[str, str]
) -> None:
    out = tmp_path / "fox.png"
    done = _generate(
        "a red fox", "-n", "2", "-o", str(out), "--url", server.url + "/v1", *flags, env=env
    )
    assert done.returncode == 0, done.stderr
    for name in ("fox-0.png", "fox-1.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == (64, 64)


def test_generate_without_the_key_says_401_in_one_line(server: ServeLocal, tmp_path: Path) -> None:
    done = _generate("a red fox", "-o", str(tmp_path / "x.png"), "--url", server.url, env={})
    assert done.returncode == 2
    assert done.stderr.startswith("error: HTTP 401") and "Traceback" not in done.stderr
