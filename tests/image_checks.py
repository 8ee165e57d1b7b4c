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
