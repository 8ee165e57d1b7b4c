"""Support code: what the core modules never import at their top, so a copied core module brings none of it.

- `tools/demo.py`: the CPU demo that `python train.py` runs with no arguments (tiny random-weight models, the
  in-process demo judges, built-in prompts and sources); imported by train.py only when no --model is given.
- `tools/memory.py`: the weight-free memory estimator of one RPO step at full size (`python bench.py memory`);
  imported by train.py only on CUDA, for the warning before a model loads.
"""
