"""Test set-up: no GPU here, so Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit decides at decoration
time), hence here, at the top of the first file pytest loads.

A suite started in the background of a non-interactive shell (``make test &``, ``nohup``) inherits SIGINT
ignored (POSIX), and Python then keeps it ignored: the Ctrl-C tests, which send this process and its children a
real SIGINT, need Python's own handler, so it is put back (the children, exec'd, then start with the default).
"""

import os
import signal

import torch

signal.signal(signal.SIGINT, signal.default_int_handler)

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


def _real_model(name):
    """A prepared real checkpoint (tuna models prepare NAME), or a skip naming what to install. Under CI (where
    the set-up installs the extra) a missing model fails instead: a green run must not hide it."""
    from tuna_train.real_models import install_hint, prepare

    try:
        return prepare(name)
    except (FileNotFoundError, ImportError) as error:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed on CI: {error}")
        pytest.skip(f"{name} is not installed ({install_hint(name)})")


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face directory (LlamaForCausalLM, tied, V 49152, chat template)."""
    return _real_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_dir():
    """Gemma 3 270M as a Hugging Face directory (Gemma3ForCausalLM, tied, V 262144, Gemma's turn format)."""
    return _real_model("gemma3-270m")
