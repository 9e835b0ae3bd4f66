"""Test set-up: no GPU here, so Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit decides at decoration
time), hence here, at the top of the first file pytest loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (hidden 64) with the byte-level tokenizer: a local model directory for CLI tests."""
    from tuna_train.model import build_tiny_llama, synthetic_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    build_tiny_llama(hidden_size=64, seed=5).save_pretrained(str(path))
    synthetic_tokenizer().save_pretrained(str(path))
    return path
