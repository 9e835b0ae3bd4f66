"""The architecture holds: imports at module top (optional dependencies aside) with no cycle, each ranking
metric defined once, a loss added with one function and one registry line, the pipeline's config documented."""

import ast
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

from tuna_kernels import LOSSES, RankingOptions, ordered_pairs, register_loss
from tuna_kernels.backend import LogprobBackend
from tuna_kernels.chunked import ChunkedBackend
from tuna_kernels.kernels.launch import TritonBackend
from tuna_train import commands
from tuna_train.cli_reference import example_config
from tuna_train.config import TrainConfig, load_config
from tuna_train.trainer import Trainer
from tuna_train.pipeline.workflow import PipelineConfig, load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tuna_kernels", "tuna_hf", "tuna_train")
# imported where they are needed: absent on some machines (GPU-only, other platforms) or plotting only
OPTIONAL = ("bitsandbytes", "flash_attn", "deepspeed", "matplotlib", "triton", "tuna_kernels.kernels.launch",
            "gguf", "peft", "if_verifiable", "langdetect")  # peft: optional for tuna_hf (torch + transformers
# only); gguf: tuna models only; if_verifiable (and its langdetect): the verifiable extra, tuna_train.verifiable only


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield name, path, ast.parse(path.read_text())


def imported(module: str, path: Path, node) -> list:
    """Absolute names an import statement brings in (``from . import x`` gives ``package.x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    base = ".".join(part for part in (package if node.level else "", node.module or "") if part)
    return [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]


def test_imports_sit_at_module_top_except_optional_dependencies():
    inside = []
    for module, path, tree in modules():
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        names = imported(module, path, node)
                        if not all(name.startswith(OPTIONAL) for name in names):
                            inside.append(f"{path.relative_to(ROOT)}:{node.lineno} {names}")
    assert not inside, inside


def test_no_import_cycle_between_modules():
    known = {module for module, _, _ in modules()}
    graph = {}
    for module, path, tree in modules():
        targets = set()
        for node in tree.body:  # module-level imports: the ones that run at import time
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in imported(module, path, node):
                    while name and name not in known:
                        name = name.rpartition(".")[0]
                    if name and name != module and not module.startswith(name + "."):  # a package's own __init__
                        targets.add(name)
        graph[module] = targets
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
    for lower, forbidden in (("tuna_kernels", ("tuna_hf", "tuna_train")), ("tuna_hf", ("tuna_train",))):
        upward = sorted(f"{m} -> {name}" for m in graph if m.startswith(lower)
                        for name in graph[m] if name.startswith(forbidden))
        assert not upward, f"imports point down only (tuna_train -> tuna_hf -> tuna_kernels): {upward}"


def test_each_ranking_metric_is_defined_once():
    """Pair agreement and the best-minus-worst gap are computed in tuna_kernels.metrics only."""
    places = {}
    for module, path, _ in modules():
        text = path.read_text()
        for pattern in (r"\[:, :, None\] > \w+\[:, None, :\]", r"def ranking_counts\b", r"def pairwise_accuracy\b",
                        r"def ranking_summary\b"):
            for _ in re.finditer(pattern, text):
                places.setdefault(pattern, []).append(module)
    assert places and all(found == ["tuna_kernels.metrics"] for found in places.values()), places


def test_a_new_loss_is_one_function_and_one_registry_line(tmp_path):
    calls = []

    @register_loss("test_best_vs_rest")
    def best_vs_rest_loss(scores, valid, options=RankingOptions(), *, target_scores=None, ref_scores=None):
        """Hinge of every candidate against the best one: mean of max(0, s_l - s_0 + margin)."""
        pairs = ordered_pairs(valid, target_scores, options.skip_ties)
        pairs[:, 1:, :] = False
        hinge = (scores[:, None, :] - scores[:, :, None] + options.margin).clamp(min=0)
        calls.append(float((hinge * pairs).sum() / pairs.sum().clamp(min=1)))
        return (hinge * pairs).sum() / pairs.sum().clamp(min=1)

    try:
        config = load_config(None, dict(loss="test_best_vs_rest", margin=0.5, synthetic_examples=64, max_steps=3,
                                        tiny_hidden_size=32, eval_fraction=0.0, progress=False, tensorboard=False,
                                        output_dir=str(tmp_path)))
        summary = Trainer(config).run()
        assert summary["status"] == "finished" and len(calls) >= 3
        assert all(value > 0 for value in calls)  # a margin of 0.5 on near-equal untrained scores
    finally:
        LOSSES.pop("test_best_vs_rest")


def test_the_pipeline_example_config_is_every_field_at_its_default():
    """configs/pipeline_example.yaml is generated from PipelineConfig (make docs) and in sync with it."""
    example = ROOT / "configs" / "pipeline_example.yaml"
    assert load_pipeline_config(str(example)) == PipelineConfig()
    text = example.read_text()
    for name in PipelineConfig.__dataclass_fields__:
        assert re.search(rf"^{name}:", text, re.M), name
    assert text == example_config(), "configs/pipeline_example.yaml is out of date: run make docs"


def test_test_modules_import_no_other_test_module():
    """Shared test code lives in helpers.py (and fake_openai.py, naive_tuna.py): a test module imports neither
    another test module nor conftest."""
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith("test_") and name != "conftest", f"{path.name} imports {name}"


def test_training_loads_no_pipeline_stage():
    """Importing the training loop or the Trainer loads no pipeline stage, no ROUGE and no IFEval checker."""
    code = ("import sys, tuna_train.trainer, tuna_train.hf_trainer; print(sorted(m for m in sys.modules if "
            "m.startswith(('tuna_train.pipeline', 'tuna_train.verifiable', 'rouge_score'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_both_backends_implement_the_one_backend_interface():
    """The chunked and the Triton backend take the same arguments, by name, as LogprobBackend declares."""
    for backend in (ChunkedBackend, TritonBackend):
        assert isinstance(backend(), LogprobBackend), backend
        for method in ("forward", "backward"):
            declared = list(inspect.signature(getattr(LogprobBackend, method)).parameters)
            assert list(inspect.signature(getattr(backend, method)).parameters) == declared, (backend, method)


#: parameters that share an option's name and default but not its meaning: every function that draws random
#: numbers takes its own seed (0 unless told); the sampler's structural grad_accum; the built-in tasks' own
#: candidates per group; the local judge's answer budget
OWN_DEFAULTS = {"seed", ("GroupSampler", "grad_accum"), ("make_records", "num_candidates"),
                ("LocalJudge", "max_new_tokens")}


def test_no_function_writes_an_options_default_again():
    """A function parameter named after an option takes the option's default by reference (``timeout: float =
    EndpointOptions.timeout``), or none: not the same literal written again, which drifts when the option's
    changes."""
    configs = [TrainConfig, PipelineConfig, *(value for value in vars(commands).values()
                                               if isinstance(value, type) and dataclasses.is_dataclass(value))]
    defaults = {}
    for config in configs:
        for declared in dataclasses.fields(config):
            if isinstance(declared.default, (int, float, str)) and not isinstance(declared.default, bool):
                defaults.setdefault(declared.name, set()).add(declared.default)
    repeated = []
    for module, path, tree in modules():
        if not module.startswith("tuna_train"):
            continue
        owners = {id(item): node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                  for item in node.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            owner = owners.get(id(node), node.name)
            positional = node.args.posonlyargs + node.args.args
            pairs = [*zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults),
                     *zip(node.args.kwonlyargs, node.args.kw_defaults)]
            for arg, default in pairs:
                if (isinstance(default, ast.Constant) and not isinstance(default.value, bool)
                        and default.value in defaults.get(arg.arg, ()) and arg.arg not in OWN_DEFAULTS
                        and (owner, arg.arg) not in OWN_DEFAULTS):
                    repeated.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}: {arg.arg}={default.value!r}")
    assert not repeated, repeated
