"""The ``tuna`` command: it only parses arguments and calls the library.

    tuna train [--config FILE.yaml] [--key value ...]     every TrainConfig field is a flag (--lora-r 8)
    tuna score --teacher PATH --data IN --out OUT          probabilistic ranking by a teacher
    tuna generate --model PATH --data IN --out OUT -k 4    diverse candidates
    tuna rank --judge openai:MODEL|local:PATH|rule|verifiable --data IN --out OUT
    tuna pipeline [--config FILE.yaml] [--key value ...]   all stages; no arguments: the embedded default
    tuna merge ADAPTER --out DIR                           a LoRA adapter merged into its base, saved whole
    tuna eval ranking|generation|judge|verifiable --model PATH --data FILE --out DIR;  tuna eval --compare RUN_A RUN_B
    tuna models prepare NAME|all;  tuna models list       real checkpoints from installed packages (--model NAME)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from peft import PeftModel

from .config import TrainConfig, choices_of, config_fields, field_kind, load_config
from .data import load_ranked
from .evaluation.generation import greedy_generations, save_generations
from .evaluation.reports import compare, markdown, write_report
from .evaluation.scoring import evaluate_ranking
from .evaluation.text import generation_metrics
from .files import WriteFailed
from .model import PLACEMENT_DEVICES, PLACEMENT_DTYPES, Placement, load_tokenizer, merge_adapter
from .pipeline.generate import generate_records
from .pipeline.http import JsonClient
from .pipeline.judge import make_judge
from .pipeline.pairwise import judge_pairwise
from .pipeline.pool import Interrupted
from .pipeline.rank import rank_records
from .pipeline.score import score_with_endpoint, score_with_model
from .pipeline.store import read_jsonl, write_jsonl
from .records import read_records, record_where
from .real_models import REAL_MODELS, install_hint, is_prepared, models_dir, prepare
from .run_dir import RESUME_HELP
from .schema import ANSWER_FIELDS, first_field
from .step import NonFiniteLossError
from .templates import TEMPLATES, check_template
from .trainer import Trainer
from .verifiable.checks import MissingCheckers
from .verifiable.evaluate import check_records
from .verifiable.pipeline import HELDOUT_SPLITS, evaluate_model
from .workflow import PipelineConfig, PipelineStopped, load_pipeline_config, resume_hint, run_pipeline


def _add_config_flags(parser: argparse.ArgumentParser, config_class: type = TrainConfig) -> None:
    """One flag per field of a config dataclass (TrainConfig, PipelineConfig), named after it, with the field's
    help text and choices; values are converted (and checked) by load_config."""
    for name, field_ in config_fields(config_class).items():
        flag = "--" + name.replace("_", "-")
        default = field_.default if field_.default is not dataclasses.MISSING else field_.default_factory()
        kind = field_kind(field_).__name__
        described = field_.metadata["help"]
        if isinstance(field_.default, bool):
            # "--lora" alone means true; "--lora false" is accepted too
            parser.add_argument(flag, dest=name, nargs="?", const="true", default=None, metavar="BOOL",
                                help=f"{described} (default: {str(default).lower()})")
        elif isinstance(default, list):  # names separated by commas (or a YAML list); checked by load_config
            parser.add_argument(flag, dest=name, default=None, metavar="NAME[,NAME...]",
                                help=f"{described}; any of {', '.join(choices_of(field_) or ())} "
                                     f"(default: {','.join(default) or 'none'})")
        else:
            choices = choices_of(field_)
            parser.add_argument(flag, dest=name, default=None, metavar=kind.upper() if choices is None else None,
                                choices=choices, help=f"{described} (default: {default})")


def _add_text_flags(parser: argparse.ArgumentParser, max_length: bool = True) -> None:
    """How records become prompts (and how long a candidate may be), as in training."""
    parser.add_argument("--template", default="auto", choices=TEMPLATES,
                        help="prompt template: auto (the tokenizer's chat template where it has one, else Alpaca; "
                             "an endpoint teacher: Alpaca), Alpaca (as the paper), the tokenizer's chat template, or "
                             "none (default: auto)")
    if max_length:
        parser.add_argument("--max-length", type=int, default=512,
                            help="tokens per candidate (prompt + response + EOS), cut as in training (default: 512)")


def _number(kind: type, minimum: float, inclusive: bool = True):
    """An argparse type: a finite ``kind`` >= ``minimum`` (> when not ``inclusive``), so that a value that would
    fail every request (a zero deadline, no parse attempt) is refused before anything is read or sent."""
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} {bound}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def _add_endpoint_flags(parser: argparse.ArgumentParser, judge: bool = True) -> None:
    """An OpenAI-compatible endpoint (tuna score's teacher, tuna rank's and tuna eval judge's judge): where, the
    key's variable, deadlines, concurrency, and (for judges) how often an unparsable answer is asked again.
    Each bound is checked here, once, for every command that takes the flags."""
    parser.add_argument("--base-url", default=None, help="the endpoint's base URL (e.g. http://localhost:8000/v1)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key (never written anywhere)")
    parser.add_argument("--concurrency", type=_number(int, 1), default=4,
                        help="requests in flight at once, >= 1 (default: 4)")
    parser.add_argument("--timeout", type=_number(float, 0, inclusive=False), default=60.0,
                        help="deadline in seconds for one whole HTTP attempt (connect, send, receive the full "
                             "answer), not per socket read; > 0 (default: 60)")
    parser.add_argument("--max-retries", type=_number(int, 0), default=5,
                        help="retries of a request after 429, 5xx, a time-out or a malformed answer, >= 0 "
                             "(default: 5)")
    parser.add_argument("--max-backoff", type=_number(float, 0), default=30.0,
                        help="longest wait in seconds between retries, also when the server's Retry-After asks "
                             "for more, >= 0 (default: 30). One request ends within (max-retries + 1) x timeout + "
                             "max-retries x max-backoff seconds (6 x 60 + 5 x 30 = 510 s by default)")
    if judge:
        parser.add_argument("--parse-attempts", type=_number(int, 1), default=3,
                            help="times a record is asked when the judge's answer cannot be parsed (no valid "
                                 "ranking or verdict), >= 1; a local judge samples the answers asked again "
                                 "(default: 3)")
        parser.add_argument("--judge-max-tokens", type=_number(int, 1), default=2048,
                            help="longest answer in tokens an openai:MODEL judge is asked for (max_tokens), >= 1; "
                                 "bounds each request's time on a slow endpoint (default: 2048)")


def _add_retry_failed_flag(parser: argparse.ArgumentParser) -> None:
    """The commands that cache failed records (rank, score) ask them again only when told."""
    parser.add_argument("--retry-failed", action="store_true", help="ask again for records cached as failed")


def _add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """Where a model that only runs (no training) is loaded: the same options for every such command."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="where the model runs: auto (the first GPU if there is one, else the CPU), cpu, "
                             "cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=PLACEMENT_DTYPES,
                        help="weight and compute dtype: auto = bfloat16 on GPUs that support it, float16 on older "
                             "GPUs, float32 on the CPU (default: auto)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="load the weights in 4-bit NF4 (bitsandbytes), computing in --dtype; on CUDA the model "
                             "is placed with device_map on --device")


def _placement(args) -> Placement:
    device = args.pop("device")
    if device not in PLACEMENT_DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"--device must be one of {PLACEMENT_DEVICES} or cuda:N, got {device!r}")
    return Placement(device=device, dtype=args.pop("dtype"), load_in_4bit=args.pop("load_in_4bit"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuna", description="Tuna ranking fine-tuning, fused and memory-lean.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train with the Tuna ranking loss (no arguments: the embedded default)",
                                description="Every field of TrainConfig is a flag; a YAML file (--config) sets "
                                            "the same fields. Flags override the file.")
    train.add_argument("--config", dest="config_file", default=None, help="YAML file of TrainConfig fields")
    train.epilog = RESUME_HELP
    _add_config_flags(train)

    score = commands.add_parser("score", help="probabilistic ranking: score responses by a teacher's log-likelihoods")
    score.add_argument("--teacher", required=True, help="local model directory, or openai:MODEL with --base-url")
    score.add_argument("--data", required=True, help="JSON lines of instructions with their responses")
    score.add_argument("--out", required=True, help="JSON lines written: each record with its scores and ranking")
    score.add_argument("--alpha", type=float, default=1.0, help="score = sum / tokens ** alpha (default: 1, the mean)")
    _add_text_flags(score)
    score.add_argument("--token-budget", type=int, default=16384, help="tokens per scoring batch (default: 16384)")
    _add_endpoint_flags(score, judge=False)  # for an openai:MODEL teacher
    _add_retry_failed_flag(score)
    _add_placement_flags(score)

    generate = commands.add_parser("generate", help="sample K diverse responses per instruction")
    generate.add_argument("--model", required=True, help="local model (or LoRA adapter) directory that samples")
    generate.add_argument("--data", required=True, help="JSON lines of instructions")
    generate.add_argument("--out", required=True, help="JSON lines written, one record per instruction (resumable)")
    generate.add_argument("-k", type=int, default=4, help="responses per instruction (default: 4)")
    _add_text_flags(generate, max_length=False)
    generate.add_argument("--max-new-tokens", type=int, default=512, help="tokens per response (default: 512)")
    generate.add_argument("--temperature", type=float, default=1.0, help="first sampling temperature (default: 1)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    generate.add_argument("--rouge-threshold", type=float, default=0.8,
                          help="resample when two responses have ROUGE-L F at or above this (default: 0.8)")
    generate.add_argument("--temperature-step", type=float, default=0.1,
                          help="temperature added at each resampling (default: 0.1)")
    generate.add_argument("--max-tries", type=int, default=3,
                          help="samplings per instruction at most; the most diverse set is kept (default: 3)")
    generate.add_argument("--batch-size", type=int, default=8, help="instructions sampled together (default: 8)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed: with each record's id (or text) it seeds "
                          "that record's draws, so a resumed run writes what an uninterrupted one does (default: 0)")
    _add_placement_flags(generate)

    rank = commands.add_parser("rank", help="contextual ranking of responses by a judge")
    rank.add_argument("--judge", required=True, help="openai:MODEL | local:PATH | rule | verifiable (the IFEval "
                      "checkers of each record's 'constraints': candidates ranked by the fraction followed)")
    rank.add_argument("--data", required=True, help="JSON lines of instructions with their responses")
    rank.add_argument("--out", required=True, help="JSON lines of ranked records (failures in OUT.failures.jsonl)")
    _add_endpoint_flags(rank)
    _add_retry_failed_flag(rank)
    rank.add_argument("--include-judge-response", action="store_true",
                      help="keep the judge's own reference response (its ###Response K) as a ranked candidate "
                           "where the judge ranks it (default: left out)")
    _add_placement_flags(rank)  # for a local:PATH judge

    evaluate = commands.add_parser("eval", help="ranking accuracy, ROUGE-L on instruction tasks; --compare reports")
    evaluate.add_argument("kind", nargs="?", choices=["ranking", "generation", "judge", "verifiable"],
                          help="ranking: pairwise accuracy and Kendall tau of held-out ranked records; generation: "
                               "ROUGE-L of greedy answers; judge: win rate against a baseline's answers; "
                               "verifiable: IFEval's prompt- and instruction-level accuracy, strict and loose, of "
                               "greedy answers to records with 'constraints'")
    evaluate.add_argument("--model", help="local model directory")
    evaluate.add_argument("--adapter", default=None, help="a LoRA adapter directory to load on the model")
    evaluate.add_argument("--data", help="ranked records (ranking) or tasks with references (generation)")
    evaluate.add_argument("--out", default="runs/eval", help="directory for report-<kind>.json and .md (kinds do not overwrite each other)")
    evaluate.add_argument("--name", default=None, help="the column name of this run in comparisons")
    evaluate.add_argument("--alpha", type=float, default=1.0,
                          help="ranking: score = sum / tokens ** alpha (default: 1, as in training)")
    _add_text_flags(evaluate)
    evaluate.add_argument("--max-new-tokens", type=int, default=128,
                          help="generation, judge: tokens per greedy answer (default: 128)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="records run together (default: 16)")
    evaluate.add_argument("--baseline-answers", default=None, help="judge: JSONL of the baseline's answers")
    evaluate.add_argument("--judge", default=None, help="judge: openai:MODEL | local:PATH")
    _add_endpoint_flags(evaluate)
    evaluate.add_argument("--compare", nargs="+", metavar="RUN", help="print these reports side by side")
    evaluate.add_argument("--png", default=None, help="with --compare: also write a bar chart here")
    _add_placement_flags(evaluate)

    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base model and save the result whole",
                                description="Loads the adapter's base model (a local directory, named in its "
                                            "adapter_config.json) unquantised, merges the adapter into its weights "
                                            "and writes a plain model (safetensors, config, tokenizer) that "
                                            "from_pretrained loads and `tuna train --model` trains from.")
    merge.add_argument("adapter", help="the LoRA adapter directory (e.g. runs/tuna_p/final of a --lora run)")
    merge.add_argument("--out", required=True, help="directory for the merged model")
    merge.add_argument("--dtype", default="float32", choices=tuple(PLACEMENT_DTYPES[1:]),
                       help="dtype of the base while merging and of the saved weights (default: float32)")
    merge.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code")

    models = commands.add_parser("models", help="real pretrained models shipped by registry packages",
                                 description="Prepares a Hugging Face directory (float32 safetensors, config, "
                                             "tokenizer, chat template) from a GGUF checkpoint of an installed "
                                             "package, in the cache $TUNA_MODELS_DIR (default ~/.cache/tuna/models). "
                                             "Every --model (and --teacher) then takes the short name.")
    models.add_argument("action", choices=("prepare", "list"), help="prepare: make the directory; list: show the "
                                                                     "models, whether installed and where prepared")
    models.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to prepare or list: {', '.join(REAL_MODELS)} or all (default: all)")
    models.add_argument("--force", action="store_true", help="prepare again even when the directory exists")

    pipeline = commands.add_parser("pipeline", help="score -> train Tuna_p -> generate -> rank -> train Tuna_c")
    pipeline.add_argument("--config", dest="config_file", default=None,
                          help="YAML file of pipeline fields (configs/pipeline_example.yaml); flags override it")
    _add_config_flags(pipeline, PipelineConfig)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = args.pop("command")
    try:
        if command == "train":
            return _train(args)
        if command == "score":
            return _score(args)
        if command == "generate":
            return _generate(args)
        if command == "rank":
            return _rank(args)
        if command == "eval":
            return _eval(args)
        if command == "merge":
            return _merge(args)
        if command == "models":
            return _models(args)
        return _pipeline(args)
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


def _models(args) -> int:
    names = list(REAL_MODELS) if not args["names"] or "all" in args["names"] else args["names"]
    unknown = [name for name in names if name not in REAL_MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}: the real models are {', '.join(REAL_MODELS)} (or all)")
    if args["action"] == "list":
        for name in names:
            where = models_dir() / name
            state = f"prepared in {where}" if is_prepared(where) else \
                f"not prepared (tuna models prepare {name}; it needs: {install_hint(name)})"
            print(f"{name}: {state}")
        return 0
    for name in names:
        print(f"tuna models: {name} -> {prepare(name, force=args['force'])}")
    return 0


def _train(args) -> int:
    config_file = args.pop("config_file")
    overrides = {key: value for key, value in args.items() if value is not None}
    try:
        config = load_config(config_file, overrides)
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


def _score(args) -> int:
    """Against an endpoint, as _rank: exit 3 when no record was scored, 130 on Ctrl-C (main)."""
    placement = _placement(args)
    if args["teacher"].startswith("openai:"):
        if not args["base_url"]:
            raise ValueError("--teacher openai:MODEL needs --base-url (an endpoint that echoes prompt log-probs)")
        client = JsonClient(args["base_url"], args["api_key_env"], args["timeout"], args["max_retries"],
                            max_backoff=args["max_backoff"])
        rows = list(read_records(args["data"]))
        stats = score_with_endpoint(client, args["teacher"].split(":", 1)[1], [record for _, _, record in rows],
                                    args["out"], args["template"], args["alpha"], args["concurrency"],
                                    args["retry_failed"], [record_where(args["data"], n, line) for n, line, _ in rows])
        print(f"tuna score: {stats} -> {args['out']}")
        return 0 if stats["scored"] else _none_done("score", "scored", stats, args)
    records = read_jsonl(args["data"])
    tokenizer = _checked_tokenizer(args["teacher"], args["template"])
    scored = score_with_model(placement.load(args["teacher"]), tokenizer, records,
                              args["template"], args["max_length"], args["token_budget"], args["alpha"],
                              teacher_name=args["teacher"])
    write_jsonl(args["out"], scored)
    print(f"tuna score: {len(scored)} records scored -> {args['out']}")
    return 0


def _generate(args) -> int:
    tokenizer = _checked_tokenizer(args["model"], args["template"])
    model = _placement(args).load(args["model"])
    stats = generate_records(model, tokenizer, read_jsonl(args["data"]),
                             args["out"], args["k"], args["template"], args["max_new_tokens"], args["temperature"],
                             args["top_p"], args["rouge_threshold"], args["temperature_step"], args["max_tries"],
                             args["batch_size"], args["seed"])
    print(f"tuna generate: {stats} -> {args['out']}")
    return 0


def _rank(args) -> int:
    """Exit codes: 0 when a record was ranked; 3 when none was (:func:`_none_done`); 130 on Ctrl-C (main), with
    what was cached and how to resume."""
    judge = make_judge(args["judge"], args["base_url"], args["api_key_env"], args["timeout"], args["max_retries"],
                       placement=_placement(args), max_backoff=args["max_backoff"],
                       max_tokens=args["judge_max_tokens"])
    stats = rank_records(read_jsonl(args["data"]), judge, args["out"], args["concurrency"], args["parse_attempts"],
                         args["retry_failed"], args["include_judge_response"])
    print(f"tuna rank: {stats} -> {args['out']}")
    return 0 if stats["ranked"] else _none_done("rank", "ranked", stats, args)


def _none_done(command: str, done: str, stats: dict, args) -> int:
    """Exit code 3, with one line, when an endpoint command made nothing (no record ``done``): every record failed
    (the outputs are still written) or there was none."""
    why = (f"{stats['failed']} failed; their reasons are in {args['out']}.failures.jsonl" if stats["failed"]
           else f"{args['data']} holds no record")
    print(f"tuna {command}: error: no record was {done} ({why})", file=sys.stderr)
    return 3


def _eval(args) -> int:
    if args["compare"]:
        print(compare(args["compare"], args["png"]), end="")
        return 0
    if not (args["kind"] and args["model"] and args["data"]):
        raise ValueError("tuna eval needs KIND (ranking | generation | judge | verifiable), --model and --data, "
                         "or --compare RUN ...")
    if args["kind"] == "verifiable":  # bad constraints (or no if-verifiable) are said before the model loads
        check_records(read_jsonl(args["data"]), args["data"])

    placement = _placement(args)
    tokenizer = _checked_tokenizer(args["model"], args["template"])
    model = placement.load(args["model"])
    if args["adapter"]:
        model = PeftModel.from_pretrained(model, args["adapter"]).eval()
    out, name = Path(args["out"]), args["name"] or Path(args["adapter"] or args["model"]).name
    if args["kind"] == "ranking":
        examples, _ = load_ranked(args["data"])
        metrics = evaluate_ranking(model, tokenizer, examples, template=args["template"],
                                              max_length=args["max_length"], alpha=args["alpha"])
    elif args["kind"] == "judge":
        if not (args["baseline_answers"] and args["judge"]):
            raise ValueError("tuna eval judge needs --baseline-answers FILE and --judge openai:MODEL|local:PATH")
        questions = read_jsonl(args["data"])
        baseline = [first_field(a, ANSWER_FIELDS) for a in read_jsonl(args["baseline_answers"])]
        if len(baseline) != len(questions) or any(not isinstance(a, str) for a in baseline):
            raise ValueError(f"{args['baseline_answers']}: needs one 'answer' string per question "
                             f"({len(questions)} in {args['data']})")
        answers = greedy_generations(model, tokenizer, questions, out / "progress.jsonl", args["template"],
                                                args["max_new_tokens"], args["batch_size"])
        judge = make_judge(args["judge"], args["base_url"], args["api_key_env"], args["timeout"], args["max_retries"],
                           max_backoff=args["max_backoff"], max_tokens=args["judge_max_tokens"])
        result = judge_pairwise(judge, questions, answers, baseline, out / "verdicts.cache.jsonl", args["concurrency"],
                                args["parse_attempts"])
        write_jsonl(out / "verdicts.jsonl", result.pop("rows"))
        metrics = result
    elif args["kind"] == "verifiable":
        metrics = evaluate_model(model, tokenizer, read_jsonl(args["data"]), out, args["template"],
                                 args["max_new_tokens"], args["batch_size"], args["data"])
    else:
        records = read_jsonl(args["data"])
        predictions = greedy_generations(model, tokenizer, records, out / "progress.jsonl", args["template"],
                                                    args["max_new_tokens"], args["batch_size"])
        save_generations(out, records, predictions)
        metrics = generation_metrics(records, predictions)
    report = write_report(out, args["kind"], name, metrics)
    print(markdown([report]), end="")
    return 0


def _merge(args) -> int:
    out = merge_adapter(args["adapter"], args["out"], args["dtype"], args["trust_remote_code"])
    print(f"tuna merge: {args['adapter']} merged into its base -> {out}")
    return 0


def _pipeline(args) -> int:
    config_file = args.pop("config_file")
    overrides = {key: value for key, value in args.items() if value is not None}
    config = load_pipeline_config(config_file, overrides)
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


if __name__ == "__main__":
    sys.exit(main())
