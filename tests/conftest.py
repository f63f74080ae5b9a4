import os

import pytest

os.environ.setdefault("OPENAI_API_KEY", "sk-test")

try:  # tests/ as a package
    from .stub_openai import StubOpenAI
except ImportError:  # rootdir-relative (default "prepend" import mode)
    from stub_openai import StubOpenAI


@pytest.fixture(scope="session")
def stub_server():
    """One StubOpenAI server for the whole test session."""
    server = StubOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def stub_openai(stub_server):
    """The session stub server, with queue/responder/requests cleared."""
    stub_server.reset()
    return stub_server
