"""Session fixtures shared by the test files: the folder the demo's tiny models are built into once, and the real
`transformers serve` servers of tests/real_server.py (each started once per session on first use, about 7 s on
2 cores, and killed at the end). Every test runs on one intra-op thread.
"""
import pytest
import torch

from real_server import UNIVERSAL_ANSWER, RealServer, build_tiny_llava


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """train.py's --cache_dir: the tiny demo models are built there once per session."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def random_server(tmp_path_factory):
    """transformers serve on a tiny random-weight LLaVA: every answer is garbage."""
    folder = tmp_path_factory.mktemp("random_llava")
    with RealServer(build_tiny_llava(folder / "tiny-llava"), log_dir=folder) as server:
        yield server


@pytest.fixture(scope="session")
def fixed_server(tmp_path_factory):
    """transformers serve on a tiny LLaVA rigged to answer UNIVERSAL_ANSWER (a valid verdict [1, 2]) always."""
    folder = tmp_path_factory.mktemp("fixed_llava")
    with RealServer(build_tiny_llava(folder / "tiny-llava", answer=UNIVERSAL_ANSWER), log_dir=folder) as server:
        yield server


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: the tiny models gain nothing from more, and on a busy CPU spinning threads
    made the policy tests 5-20 times slower (outputs are bitwise the same with 1 or 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
