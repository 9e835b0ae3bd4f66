"""The ``tuna`` command: it only parses arguments and calls the library.

    tuna train [--config FILE.yaml] [--key value ...]     every TrainConfig field is a flag (--lora-r 8)
    tuna score --teacher PATH --data IN --out OUT          probabilistic ranking by a teacher
    tuna generate --model PATH --data IN --out OUT -k 4    diverse candidates
    tuna rank --judge openai:MODEL|local:PATH|rule|verifiable --data IN --out OUT
    tuna pipeline [--config FILE.yaml] [--key value ...]   all stages; no arguments: the embedded default
    tuna merge ADAPTER --out DIR                           a LoRA adapter merged into its base, saved whole
    tuna eval ranking|generation|judge|verifiable --model PATH --data FILE --out DIR;  tuna eval --compare RUN_A RUN_B
    tuna models prepare NAME|all;  tuna models list       real checkpoints from installed packages (--model NAME)

Each command is one row of :data:`COMMANDS`: its configuration dataclass (every field a flag, with the field's
help, choices and bound: :mod:`.options`), and the handler that runs a loaded configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

from peft import PeftModel

from .commands import EvalConfig, GenerateConfig, MergeConfig, ModelsConfig, RankConfig, ScoreConfig
from .config import TrainConfig, field_kind, load_config
from .data import load_ranked
from .evaluation.generation import greedy_generations, save_generations
from .evaluation.reports import compare, markdown, write_report
from .evaluation.scoring import evaluate_ranking
from .evaluation.text import generation_metrics
from .files import WriteFailed
from .model import load_tokenizer, merge_adapter
from .options import SamplingOptions, choices_of, options_of, ordered_fields
from .pipeline.generate import generate_records
from .pipeline.http import JsonClient
from .pipeline.judge import make_judge
from .pipeline.pairwise import judge_pairwise
from .pipeline.pool import Interrupted
from .pipeline.rank import rank_records
from .pipeline.score import score_with_endpoint, score_with_model
from .pipeline.store import read_jsonl, write_jsonl
from .pipeline.workflow import PipelineConfig, PipelineStopped, resume_hint, run_pipeline
from .records import read_records, record_where
from .real_models import REAL_MODELS, install_hint, is_prepared, models_dir, prepare
from .run_dir import RESUME_HELP
from .schema import ANSWER_FIELDS, first_field
from .step import NonFiniteLossError
from .templates import check_template
from .trainer import Trainer
from .verifiable.checks import MissingCheckers
from .verifiable.evaluate import check_records
from .verifiable.pipeline import HELDOUT_SPLITS, evaluate_model


def _add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag (or positional argument) per field of a config dataclass, named after it, with the field's help,
    choices and bound; values are converted (and checked) by load_config, and a flag not given is None, so that
    a YAML file (--config) can set the field. The command's own fields come first, then its option groups'."""
    for name, field_ in ordered_fields(config_class).items():
        metadata = dict(field_.metadata)
        default = field_.default if field_.default is not dataclasses.MISSING else field_.default_factory()
        described, choices = metadata.pop("help"), choices_of(field_)
        metadata.pop("choices")
        positional = metadata.pop("positional", False)
        names = [name] if positional else ["--" + name.replace("_", "-"), *metadata.pop("aliases", [])]
        options = dict(dest=name) if not positional else {}
        if positional:  # argparse requires a positional argument unless its nargs says it may be left out
            metadata.pop("required", None)
            text = described
        elif metadata.get("required"):
            text = described
        elif isinstance(default, list) and not default:
            text = f"{described} (default: none)"
        elif isinstance(default, list):
            text = f"{described} (default: {','.join(default)})"
        else:
            text = f"{described} (default: {str(default).lower() if isinstance(default, bool) else default})"
        if isinstance(default, bool):  # "--lora" alone means true; "--lora false" is accepted too
            options.update(nargs="?", const="true", metavar="BOOL")
        elif isinstance(default, list) and "nargs" not in metadata:
            # names separated by commas (or a YAML list); checked by load_config
            options.update(metavar="NAME[,NAME...]")
            text = text.replace(" (default:", f"; any of {', '.join(choices or ())} (default:") if choices else text
        else:
            options.update(choices=choices)
            if choices is None and "metavar" not in metadata and not positional:
                options["metavar"] = field_kind(field_).__name__.upper()
            if default is None and not metadata.get("required"):  # "none" must reach load_config as text
                metadata.pop("type", None)
        # argparse formats help with %: a literal one ("10% of the steps") is written %%
        parser.add_argument(*names, default=None, help=text.replace("%", "%%"), **options, **metadata)


class Command(NamedTuple):
    """One ``tuna`` command: its configuration, its handler (config -> exit code), and its help."""

    config_class: type
    handler: Callable[..., int]
    help: str
    description: Optional[str] = None
    yaml: bool = False  # a --config FILE.yaml of the configuration's fields


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuna", description="Tuna ranking fine-tuning, fused and memory-lean.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.description)
        if command.yaml:
            sub.add_argument("--config", dest="config_file", default=None,
                             help=f"YAML file of {command.config_class.__name__} fields; flags override it")
        _add_config_flags(sub, command.config_class)
        if command.config_class is TrainConfig:
            sub.epilog = RESUME_HELP
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> Tuple[str, object]:
    """The command named by ``argv`` and its loaded, validated configuration (argparse exits on a usage error)."""
    args = vars(build_parser().parse_args(argv))
    name = args.pop("command")
    config_file = args.pop("config_file", None)
    overrides = {key: value for key, value in args.items() if value is not None}
    return name, load_config(config_file, overrides, config_class=COMMANDS[name].config_class)


def main(argv: Optional[Sequence[str]] = None) -> int:
    command = (list(argv) if argv is not None else sys.argv[1:])[:1]
    command = command[0] if command else "tuna"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        command, config = parse_config(argv)
        return COMMANDS[command].handler(config)
    except (ValueError, FileNotFoundError, WriteFailed, MissingCheckers) as error:  # WriteFailed: a full disk, named
        print(f"tuna {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        if not isinstance(error, Interrupted) and command not in ("rank", "score"):
            raise  # a Ctrl-C elsewhere keeps Python's own handling (tuna train saves a checkpoint first)
        # Interrupted: a Ctrl-C while asking an endpoint (also in the pipeline's rank stage); every answer received
        # is cached and its one line says how to resume. Else rank and score were still reading their input.
        print(f"tuna {command}: {error if isinstance(error, Interrupted) else 'interrupted before any request'}",
              file=sys.stderr)
        return 130


def _models(config: ModelsConfig) -> int:
    names = list(REAL_MODELS) if not config.names or "all" in config.names else config.names
    unknown = [name for name in names if name not in REAL_MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}: the real models are {', '.join(REAL_MODELS)} (or all)")
    if config.action == "list":
        for name in names:
            where = models_dir() / name
            state = f"prepared in {where}" if is_prepared(where) else \
                f"not prepared (tuna models prepare {name}; it needs: {install_hint(name)})"
            print(f"{name}: {state}")
        return 0
    for name in names:
        print(f"tuna models: {name} -> {prepare(name, force=config.force)}")
    return 0


def _train(config: TrainConfig) -> int:
    try:
        summary = Trainer(config).run()
    except NonFiniteLossError as error:
        print(f"tuna train: error: {error}", file=sys.stderr)
        return 2
    _print_summary(config, summary)
    return 0 if summary["status"] == "finished" else 3


def _checked_tokenizer(model: str, template: str):
    """The tokenizer of ``model``, with ``template`` checked on it: a template that cannot apply (chat on a
    tokenizer without one) is refused before the model loads."""
    tokenizer = load_tokenizer(model)
    check_template(template, tokenizer, model)
    return tokenizer


def _score(config: ScoreConfig) -> int:
    """Against an endpoint, as _rank: exit 3 when no record was scored, 130 on Ctrl-C (main)."""
    if config.teacher.startswith("openai:"):
        if not config.base_url:
            raise ValueError("--teacher openai:MODEL needs --base-url (an endpoint that echoes prompt log-probs)")
        client = JsonClient(config.base_url, config.api_key_env, config.timeout, config.max_retries,
                            max_backoff=config.max_backoff)
        rows = list(read_records(config.data))
        stats = score_with_endpoint(client, config.teacher.split(":", 1)[1], [record for _, _, record in rows],
                                    config.out, config.template, config.alpha, config.concurrency,
                                    config.retry_failed, [record_where(config.data, n, line) for n, line, _ in rows])
        print(f"tuna score: {stats} -> {config.out}")
        return 0 if stats["scored"] else _none_done("score", "scored", stats, config)
    records = read_jsonl(config.data)
    tokenizer = _checked_tokenizer(config.teacher, config.template)
    scored = score_with_model(config.placement.load(config.teacher), tokenizer, records, config,
                              teacher_name=config.teacher)
    write_jsonl(config.out, scored)
    print(f"tuna score: {len(scored)} records scored -> {config.out}")
    return 0


def _generate(config: GenerateConfig) -> int:
    tokenizer = _checked_tokenizer(config.model, config.template)
    model = config.placement.load(config.model)
    stats = generate_records(model, tokenizer, read_jsonl(config.data), config.out, config.template,
                             seed=config.seed, **options_of(config, SamplingOptions))
    print(f"tuna generate: {stats} -> {config.out}")
    return 0


def _rank(config: RankConfig) -> int:
    """Exit codes: 0 when a record was ranked; 3 when none was (:func:`_none_done`); 130 on Ctrl-C (main), with
    what was cached and how to resume."""
    judge = make_judge(config.judge, config, config.placement)
    stats = rank_records(read_jsonl(config.data), judge, config.out, config.concurrency,
                         config.parse_attempts, config.retry_failed, config.include_judge_response)
    print(f"tuna rank: {stats} -> {config.out}")
    return 0 if stats["ranked"] else _none_done("rank", "ranked", stats, config)


def _none_done(command: str, done: str, stats: dict, config) -> int:
    """Exit code 3, with one line, when an endpoint command made nothing (no record ``done``): every record failed
    (the outputs are still written) or there was none."""
    why = (f"{stats['failed']} failed; their reasons are in {config.out}.failures.jsonl" if stats["failed"]
           else f"{config.data} holds no record")
    print(f"tuna {command}: error: no record was {done} ({why})", file=sys.stderr)
    return 3


def _eval(config: EvalConfig) -> int:
    if config.compare:
        print(compare(config.compare, config.png), end="")
        return 0
    if not (config.kind and config.model and config.data):
        raise ValueError("tuna eval needs KIND (ranking | generation | judge | verifiable), --model and --data, "
                         "or --compare RUN ...")
    if config.kind == "verifiable":  # bad constraints (or no if-verifiable) are said before the model loads
        check_records(read_jsonl(config.data), config.data)
    if config.kind == "judge" and not (config.baseline_answers and config.judge):
        raise ValueError("tuna eval judge needs --baseline-answers FILE and --judge openai:MODEL|local:PATH")

    tokenizer = _checked_tokenizer(config.model, config.template)
    model = config.placement.load(config.model)
    if config.adapter:
        model = PeftModel.from_pretrained(model, config.adapter).eval()
    out, name = Path(config.out), config.name or Path(config.adapter or config.model).name
    if config.kind == "ranking":
        examples, _ = load_ranked(config.data)
        metrics = evaluate_ranking(model, tokenizer, examples, config)
    elif config.kind == "judge":
        questions = read_jsonl(config.data)
        baseline = [first_field(a, ANSWER_FIELDS) for a in read_jsonl(config.baseline_answers)]
        if len(baseline) != len(questions) or any(not isinstance(a, str) for a in baseline):
            raise ValueError(f"{config.baseline_answers}: needs one 'answer' string per question "
                             f"({len(questions)} in {config.data})")
        answers = greedy_generations(model, tokenizer, questions, out / "progress.jsonl", config.template,
                                     config.max_new_tokens, config.batch_size)
        result = judge_pairwise(make_judge(config.judge, config, config.placement), questions, answers, baseline,
                                out / "verdicts.cache.jsonl", config.concurrency, config.parse_attempts)
        write_jsonl(out / "verdicts.jsonl", result.pop("rows"))
        metrics = result
    elif config.kind == "verifiable":
        metrics = evaluate_model(model, tokenizer, read_jsonl(config.data), out, config.template,
                                 config.max_new_tokens, config.batch_size, config.data)
    else:
        records = read_jsonl(config.data)
        predictions = greedy_generations(model, tokenizer, records, out / "progress.jsonl", config.template,
                                         config.max_new_tokens, config.batch_size)
        save_generations(out, records, predictions)
        metrics = generation_metrics(records, predictions)
    report = write_report(out, config.kind, name, metrics)
    print(markdown([report]), end="")
    return 0


def _merge(config: MergeConfig) -> int:
    out = merge_adapter(config.adapter, config.out, config.dtype, config.trust_remote_code)
    print(f"tuna merge: {config.adapter} merged into its base -> {out}")
    return 0


def _pipeline(config: PipelineConfig) -> int:
    try:
        report = run_pipeline(config)
    except PipelineStopped as stopped:  # Ctrl-C in a training stage: saved, nothing after it can run yet
        print(f"tuna pipeline: {stopped}", file=sys.stderr)
        return 3  # as `tuna train` stopped before its last step
    except KeyboardInterrupt:  # Ctrl-C elsewhere (generate, rank, eval keep every finished record)
        print(f"tuna pipeline: interrupted; {resume_hint(config.output_dir)}", file=sys.stderr)
        return 130
    accuracy = report["pair_accuracy"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"tuna pipeline: held-out pairwise ranking accuracy: before {fmt(accuracy['before'])}, "
          f"after Tuna_p {fmt(accuracy['after_tuna_p'])}, after Tuna_c {fmt(accuracy['after_tuna_c'])}")
    for name, metrics in report["eval"].items():
        if set(metrics) == set(HELDOUT_SPLITS):  # instructions: verifiable
            print(f"  tuna eval verifiable, {name}: prompt-level strict accuracy " + ", ".join(
                f"{split} {fmt(metrics[split]['prompt_strict'])}" for split in HELDOUT_SPLITS))
            continue
        print(f"  tuna eval, {name}: pairwise accuracy {fmt(metrics['pair_accuracy'])}, Kendall tau "
              f"{fmt(metrics['kendall_tau'])}, ROUGE-L {fmt(metrics['rouge_l'])}, "
              f"exact match {fmt(metrics.get('exact_match'))}")
    return 0


def _print_summary(config: TrainConfig, summary: dict) -> None:
    def accuracy(result):
        return "n/a" if not result or result.get("pair_accuracy") is None else f"{result['pair_accuracy']:.3f}"

    print(f"tuna train: {summary['status']} after {summary['steps']}/{summary['total_steps']} steps "
          f"in {summary['train_seconds']:.0f} s; output in {config.output_dir}")
    print(f"held-out pairwise ranking accuracy: before {accuracy(summary.get('initial_eval'))}, "
          f"after {accuracy(summary.get('final_eval'))}")
    final = summary.get("final_eval") or {}
    if "shuffled_pair_accuracy" in final:  # the controls: instruction following, not the look of the answers
        print(f"  controls after training: with another held-out prompt {final['shuffled_pair_accuracy']:.3f}, "
              f"prompt-free scorer {final['prompt_free_pair_accuracy']:.3f}")
    truncation = summary.get("truncation") or {}
    if truncation.get("groups_truncated"):
        print(f"  truncated by max_length {truncation['max_length']}: {truncation['prompts_truncated']} prompts, "
              f"{truncation['responses_truncated']} responses ({100 * truncation['truncated_fraction']:.1f}% of "
              "the training groups)")


#: every command, in the order ``tuna --help`` lists them
COMMANDS = {
    "train": Command(TrainConfig, _train, "train with the Tuna ranking loss (no arguments: the embedded default)",
                     "Every field of TrainConfig is a flag; a YAML file (--config) sets the same fields. Flags "
                     "override the file.", yaml=True),
    "score": Command(ScoreConfig, _score, "probabilistic ranking: score responses by a teacher's log-likelihoods"),
    "generate": Command(GenerateConfig, _generate, "sample K diverse responses per instruction"),
    "rank": Command(RankConfig, _rank, "contextual ranking of responses by a judge"),
    "eval": Command(EvalConfig, _eval, "ranking accuracy, ROUGE-L on instruction tasks; --compare reports"),
    "merge": Command(MergeConfig, _merge, "merge a LoRA adapter into its base model and save the result whole",
                     "Loads the adapter's base model (a local directory, named in its adapter_config.json) "
                     "unquantised, merges the adapter into its weights and writes a plain model (safetensors, "
                     "config, tokenizer) that from_pretrained loads and `tuna train --model` trains from."),
    "models": Command(ModelsConfig, _models, "real pretrained models shipped by registry packages",
                      "Prepares a Hugging Face directory (float32 safetensors, config, tokenizer, chat template) "
                      "from a GGUF checkpoint of an installed package, in the cache $TUNA_MODELS_DIR (default "
                      f"~/.cache/tuna/models). Every --model (and --teacher) then takes the short name: "
                      f"{', '.join(REAL_MODELS)}."),
    "pipeline": Command(PipelineConfig, _pipeline, "score -> train Tuna_p -> generate -> rank -> train Tuna_c",
                        "Every field of PipelineConfig is a flag; a YAML file (--config, e.g. "
                        "configs/pipeline_example.yaml) sets the same fields. Flags override the file.", yaml=True),
}


if __name__ == "__main__":
    sys.exit(main())
