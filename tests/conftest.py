"""Session fixtures shared by the test files: the folder the demo's tiny models are built into once, and the real
`transformers serve` servers of tests/real_server.py (each started once per session on first use, about 7 s on
2 cores, and killed at the end). Every test runs on one intra-op thread. The judge-side tests (test_judge.py,
test_vlm_client.py, test_data.py) share the fake VLM server of tests/fake_vlm.py, a folder of solid images and a
rubric file (helpers: tests/judge_helpers.py).
"""
import pytest
import torch

from fake_vlm import FakeVLM
from judge_helpers import BLUE, GREY, KEY, PINK, RED, solid
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


@pytest.fixture
def fake():
    """A fake OpenAI-compatible VLM server (tests/fake_vlm.py) for one test."""
    with FakeVLM() as server:
        yield server


@pytest.fixture
def images(tmp_path):
    """tmp_path/imgs holding red, blue, pink and grey solid PNGs, the images the tests' data files name."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, rgb in {"red": RED, "blue": BLUE, "pink": PINK, "grey": GREY}.items():
        solid(rgb).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def rubric(tmp_path, monkeypatch):
    """A rubric file for `judge.py eval`, with $ARR_TEST_KEY set to the test key (--api_key_env ARR_TEST_KEY)."""
    monkeypatch.setenv("ARR_TEST_KEY", KEY)
    path = tmp_path / "rubrics.txt"
    path.write_text("1. The colour the prompt names must dominate.\n")
    return path
