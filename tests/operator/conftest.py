"""Fixtures shared by the operator tests."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator

import kmock
import pytest

from tests.operator.emulator import CRD, Cluster, StampingEmulator


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    emulator = StampingEmulator()
    with warnings.catch_warnings():  # kmock 0.8 uses importlib.resources.read_binary
        warnings.simplefilter("ignore", DeprecationWarning)
        emulator.resources.load_bundled()
    emulator.resources[CRD] = kmock.ResourceInfo(
        kind="DiffusionPipeline",
        singular="diffusionpipeline",
        namespaced=True,
        shortnames={"dfp"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources={"status"},
    )
    async with emulator, kmock.Server(emulator) as server:
        yield Cluster(emulator, str(server.url).rstrip("/"))
