"""Helpers shared by the policy tests: random LoRA weights and images as float arrays."""
import numpy as np
import torch


def randomise_lora(pol, seed):
    """Give every LoRA parameter of `pol` random weights (lora_B = 0 at init would hide every LoRA bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def as_float(image):
    """A PIL image as a float array in [0, 1], for comparisons in units of 1/255."""
    return np.asarray(image).astype(np.float32) / 255.0


def one_thread():
    """Run a test on one intra-op thread (tiny ops gain nothing from more, and they spin on a busy CPU); a
    generator for pytest fixtures: `one_thread = pytest.fixture(autouse=True)(image_checks.one_thread)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
