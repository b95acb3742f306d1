"""train: QLoRA (4-bit NF4 base + LoRA adapters) or plain LoRA (or another `peft.method`)
with PEFT and the transformers Trainer, for the model of `model.task`; or, with `peft.method:
none`, full fine-tuning: every weight trains (float32 master weights) and the whole model is
written where the adapter goes.

The data is already tokenized and label-masked, so the plain Trainer with a padding-free (or
dynamic-padding) collator is all that is needed (TRL's SFTTrainer would re-derive the same).
Checkpoints go to artifacts/checkpoints every `train.save_steps`; rerunning after an interruption resumes
from the last one when params and data are unchanged, and the checkpoints are removed once
the adapter is saved.

With `train.eval_steps` the validation loss is computed every that many steps, the adapter
written is the best evaluated checkpoint's, and `train.early_stopping_patience` stops a run
that stopped improving; a resumed run keeps the best so far and the patience count (both are
in the checkpoint's trainer_state.json).

Reads data/tokenized/; writes artifacts/adapter/ (PEFT, safetensors, with the tokenizer; the
whole model, config.json and safetensors, with full fine-tuning),
metrics/train.json, metrics/train_log.tsv (loss, learning rate, tokens seen per step, and
the validation loss at the steps it was computed) and metrics/eval_log.tsv (those validation
losses alone, for dvc plots: an empty cell would be drawn as 0). While it runs, reports/progress.json says
where it is (step of max_steps, latest loss, learning rate and validation loss, tokens/s,
ETA), rewritten every few seconds; train.report_to's trackers write under logs/ (or to
MLflow's store).

    finetune train
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tasks import COMPILE_SWITCH, allow_compile
from tasks.adapters import adalora_callback
from tasks.config import PROMPT_LEARNING, Params
from tasks.errors import PipelineError, environment_errno
from tasks.io import (atomic_path, damaged, normalize_adapter_config, read_json_folder, read_json_state,
                      save_tokenizer, sha256_path, write_json, writing)
from tasks.memory import lower_training_memory, with_checkpointing
from tasks.nodes import node_local_storage, rendezvous
from tasks.encoding import IGNORE_INDEX
from tasks.modeling import device, load_tokenizer, resolve_precision
from tasks.sharding import fsdp_arguments, full_state_dict, sharded_trainer
from tasks.training import optim_name, run_name, tracked, trackers, trainable_base
from tasks.workspace import Workspace

log = logging.getLogger("finetune.train")

FINGERPRINT = "fingerprint.txt"  # in CHECKPOINTS: what the checkpoints were trained from
# Seconds between rewrites of ws.progress: often enough to watch, rare enough to cost nothing.
PROGRESS_EVERY_S = 2.0
PACKING_CHECK_ROWS = 3  # training rows packed into one sequence to test that they stay apart
# Largest |packed - separate| logit difference allowed, relative to the largest |logit|, by
# compute dtype: rounding noise is far below these, attention across examples far above.
PACKING_RTOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def _fingerprint(params: Params, ws: Workspace) -> str:
    import hashlib

    sections = {k: getattr(params, k).model_dump(mode="json")
                for k in ("model", "quant", "lora", "peft", "train")}
    del sections["train"]["report_to"]  # trackers watch the run: switching one keeps its checkpoints
    payload = json.dumps(sections, sort_keys=True) + sha256_path(ws.tokenized)
    return hashlib.sha256(payload.encode()).hexdigest()


def _resume_checkpoint(params: Params, ws: Workspace) -> str | None:
    """The last checkpoint of an interrupted run with the same inputs, else None (and a
    clean checkpoint directory)."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = ws.checkpoints / FINGERPRINT
    fingerprint = _fingerprint(params, ws)
    # Compared as bytes: a damaged marker matches nothing, and its checkpoints are discarded.
    if marker.is_file() and marker.read_bytes() == fingerprint.encode():
        # A kill while a checkpoint was being written leaves it without trainer_state.json,
        # which the Trainer writes last: drop such partial checkpoints.
        while (last := get_last_checkpoint(str(ws.checkpoints))) is not None:
            if not (Path(last) / "trainer_state.json").is_file():
                log.warning("removing incomplete checkpoint %s", last)
            elif _stopped_early(Path(last), params.train.early_stopping_patience):
                # The Trainer would train on from it (a new train() call forgets that it was
                # told to stop): the checkpoint before it retraces the same steps to the same stop.
                log.info("removing %s, saved as early stopping ended its run", last)
            else:
                log.info("resuming from %s", last)
                return last
            shutil.rmtree(last)
    elif ws.checkpoints.exists():
        log.info("discarding checkpoints of a run with other params or data")
        clear_checkpoints(ws.checkpoints, keep_folder=True)
    ws.checkpoints.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return None


def _stopped_early(checkpoint: Path, patience: int | None) -> bool:
    """Whether `checkpoint` was saved at the evaluation that made EarlyStoppingCallback stop
    the run (its patience count, in trainer_state.json, had run out)."""
    if patience is None:
        return False
    try:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
        count = saved["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # a damaged state is reported when its loss log is read (_logged_before)
    return isinstance(count, int) and count >= patience


def _trainer_wrote(path: Path) -> bool:
    """Whether `path`, in the checkpoints folder, is train's: a Trainer checkpoint or the
    fingerprint of the run it belongs to."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return path.name == FINGERPRINT or re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", path.name) is not None


def check_checkpoints(folder: Path) -> None:
    """Refuses, before any training, a checkpoints folder train could not use. A link or a
    mount point (a bigger disk for the checkpoints) is fine, and so is anything else in the
    folder (a tracker's logs, a user's notes): train removes only its own checkpoints there
    (clear_checkpoints)."""
    if folder.is_symlink() and not folder.exists():
        raise PipelineError(f"{folder} is a symlink to {os.readlink(folder)}, which does not exist: "
                            "create that folder (train keeps its checkpoints there), or remove the link")
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"{folder} is a file, where train keeps its checkpoints: move it away")


def clear_checkpoints(folder: Path, keep_folder: bool = False) -> None:
    """Removes train's checkpoints (and their fingerprint) from `folder`, then the folder
    itself unless `keep_folder`, or it is a link or a mount point someone set up for them
    (removing either fails, or would undo that set-up), or it holds anything else."""
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if _trainer_wrote(path) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif _trainer_wrote(path):
            path.unlink()
    if not (keep_folder or folder.is_symlink() or os.path.ismount(folder)) and folder.is_dir() \
            and not any(folder.iterdir()):
        folder.rmdir()


def _history_callback(history: list[dict[str, Any]], evals: list[dict[str, Any]] | None = None):
    from transformers import TrainerCallback

    class History(TrainerCallback):
        """Keeps the loss curve (and the validation losses computed while training, in
        `evals`) for dvc plots and stops on a non-finite loss."""

        def __init__(self) -> None:
            self.ended = False

        def on_train_end(self, args, state, control, **kwargs):
            self.ended = True  # an evaluation after this one scores the loaded best, not a step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs and evals is not None and not self.ended:
                evals.append({"step": state.global_step, "eval_loss": logs["eval_loss"]})
            if not logs or "loss" not in logs:
                return
            if not math.isfinite(logs["loss"]):
                raise PipelineError(f"training loss is {logs['loss']} at step {state.global_step}: "
                                    "lower train.learning_rate or check the data")
            history.append({"step": state.global_step, "loss": logs["loss"],
                            "learning_rate": logs.get("learning_rate"),
                            "tokens_seen": state.num_input_tokens_seen})

    return History()


def _logged_before(checkpoint: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """The loss rows and validation losses an interrupted run logged up to `checkpoint` (its
    trainer_state.json keeps them), in the History callback's shapes, and the checkpoint's step
    (0 for none): a resumed run's log still starts at its first step."""
    if checkpoint is None:
        return [], [], 0
    path = Path(checkpoint) / "trainer_state.json"
    recover = (f"delete {path.parent} to resume from the checkpoint before it, or "
               "artifacts/checkpoints to start over")
    state = read_json_state(path, required={"log_history": list, "global_step": int}, recover=recover)
    try:
        rows = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"),
                 "tokens_seen": e.get("num_input_tokens_seen")} for e in state["log_history"] if "loss" in e]
        evals = [{"step": e["step"], "eval_loss": e["eval_loss"]}
                 for e in state["log_history"] if "eval_loss" in e]
    except (KeyError, TypeError) as err:
        raise damaged(path, f"not the trainer state the Trainer writes ({type(err).__name__}: {err})",
                      recover) from None
    return rows, evals, state["global_step"]


def _train_loss(history: list[dict[str, Any]], result, resumed_at: int) -> float:
    """The mean loss per step over the whole run, summed the same way whether or not the run
    was resumed (the Trainer's own training_loss counts only the steps since a resume): each
    logged window's loss times its length, plus any steps after the last log, which only
    the Trainer's sum for this call holds. A checkpoint between two logs (train.save_steps
    not a multiple of logging_steps) leaves the steps from the last log to it unlogged: they
    are left out of the mean."""
    total, counted, last, this_call = 0.0, 0, 0, 0.0
    for row in history:
        start = max(last, resumed_at) if row["step"] > resumed_at else last  # the Trainer's window
        window = row["loss"] * (row["step"] - start)
        total += window
        counted += row["step"] - start
        this_call += window if row["step"] > resumed_at else 0.0
        last = row["step"]
    if last < result.global_step:
        total += result.training_loss * (result.global_step - resumed_at) - this_call
        counted += result.global_step - max(last, resumed_at)
    return total / counted if counted else result.training_loss


def _log_table(history: list[dict[str, Any]], evals: list[dict[str, Any]]) -> str:
    """metrics/train_log.tsv: a row per logged step, with the validation loss on the rows of
    the steps it was computed at (empty elsewhere; a step evaluated but not logged gets a row
    of its own)."""
    at = {e["step"]: e["eval_loss"] for e in evals}
    rows = [(h["step"], "\t".join(str(v) for v in (h["step"], h["loss"], h["learning_rate"],
                                                    h["tokens_seen"], at.pop(h["step"], ""))))
            for h in history]
    rows += [(step, f"{step}\t\t\t\t{loss}") for step, loss in at.items()]
    return "\n".join(["step\tloss\tlearning_rate\ttokens_seen\teval_loss",
                      *(row for _, row in sorted(rows, key=lambda r: r[0]))]) + "\n"


def _save_best_callback():
    from transformers import TrainerCallback

    class SaveBest(TrainerCallback):
        """Saves a checkpoint at each evaluation that beats the best so far, also between
        save_steps: the Trainer loads the best model at the end only from a checkpoint, so
        without this the best of evaluations between two saves would be lost."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            name = args.metric_for_best_model
            value = (metrics or {}).get(name if name.startswith("eval_") else f"eval_{name}")
            # Called before the Trainer updates state.best_metric with this evaluation.
            if value is not None and (state.best_metric is None or (
                    value > state.best_metric if args.greater_is_better else value < state.best_metric)):
                control.should_save = True

    return SaveBest()


def _progress_callback(ws: Workspace):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Writes where training is (ws.progress) for whoever watches the stage from
        outside, such as the Prefect flow, which cannot see inside this process."""

        def __init__(self) -> None:
            self.started = self.written = 0.0
            self.first_step = self.first_tokens = 0
            self.last: dict[str, Any] = {}
            self.evaluated: dict[str, Any] = {}
            self.ended = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            self.first_step, self.first_tokens = state.global_step, state.num_input_tokens_seen
            self._write(state, force=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.last = {"loss": logs["loss"], "learning_rate": logs.get("learning_rate")}
            if logs and "eval_loss" in logs and not self.ended:
                self.evaluated = {"eval_loss": logs["eval_loss"], "eval_step": state.global_step}
            self._write(state)

        def on_train_end(self, args, state, control, **kwargs):
            self._write(state, force=True)
            self.ended = True

        def _write(self, state, force: bool = False) -> None:
            now = time.monotonic()
            if not state.is_world_process_zero or (not force and now - self.written < PROGRESS_EVERY_S):
                return
            self.written = now
            elapsed, done = now - self.started, state.global_step - self.first_step
            left = state.max_steps - state.global_step
            write_json(ws.progress, {
                "step": state.global_step, "max_steps": state.max_steps,
                "percent": round(100 * state.global_step / max(state.max_steps, 1), 1),
                **self.last, **self.evaluated,
                "tokens_per_second": round((state.num_input_tokens_seen - self.first_tokens) / elapsed, 1)
                if elapsed > 0 else None,
                "elapsed_seconds": round(elapsed, 1),
                "eta_seconds": round(left * elapsed / done, 1) if done else None})

    return Progress()


def _model(params: Params, tokenizer):
    from peft import get_peft_model

    from tasks.adapters import check_supported, peft_config, settle

    base = trainable_base(params, tokenizer)
    if params.peft.full_finetune:
        return base  # every weight trains: nothing to wrap
    check_supported(params, base)
    model = get_peft_model(base, peft_config(params))
    settle(model)
    return model


def _parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters: PEFT's count for an adapter (it counts 4-bit weights by
    the values they hold), else every parameter of the model, which all train."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    weights = list(model.parameters())
    return sum(w.numel() for w in weights if w.requires_grad), sum(w.numel() for w in weights)


def _tf32(setting: str | bool) -> bool | None:
    import torch

    ampere = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    if setting == "auto":
        return True if ampere else None  # None: leave torch's default (TF32 needs CUDA)
    if setting and not ampere:
        raise PipelineError("train.tf32 is true but this machine has no GPU with TF32 "
                            "(Ampere or newer): use auto")
    return setting


def training_arguments(params: Params, output_dir: str, report_to: list[str] | None = None,
                       run_name: str | None = None):
    from transformers import TrainingArguments

    t = params.train
    if t.torch_compile and not allow_compile():
        raise PipelineError(f"train.torch_compile is true but {COMPILE_SWITCH}=1 is set in the "
                            "environment: unset it, or set train.torch_compile: false")
    precision = resolve_precision(t.precision)
    fields = t.model_dump(exclude={"precision", "optim", "gradient_checkpointing", "tf32",
                                   "padding_free", "num_processes", "num_nodes", "fsdp", "report_to", "metric_for_best_model",
                                   "early_stopping_patience", "early_stopping_threshold"})
    evaluated = t.eval_steps is not None
    if t.use_liger_kernel:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise PipelineError("train.use_liger_kernel is true but the liger-kernel package is not "
                                "installed (pip install liger-kernel, on a CUDA machine)")
    return TrainingArguments(
        output_dir=output_dir, **fields, optim=optim_name(params),
        bf16=precision == "bf16", fp16=precision == "fp16", tf32=_tf32(t.tf32),
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        full_determinism=device() == "cpu",  # CUDA kernels would pay for it in speed
        data_seed=t.seed, save_strategy="steps", logging_strategy="steps",
        # With eval_steps the adapter is the best evaluated checkpoint (lower is better for a
        # loss: the Trainer derives greater_is_better from the name) ...
        eval_strategy="steps" if evaluated else "no", load_best_model_at_end=evaluated,
        metric_for_best_model=t.metric_for_best_model if evaluated else None,
        # ... and a resumed run gets back EarlyStoppingCallback's patience count.
        restore_callback_states_from_checkpoint=t.early_stopping_patience is not None,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        label_names=["labels"],  # a PeftModel's forward hides the argument the Trainer looks for
        use_cpu=device() == "cpu", report_to=report_to or "none", run_name=run_name,
        disable_tqdm=False,
        ddp_backend="gloo" if device() == "cpu" and t.world_size > 1 else None,
        logging_nan_inf_filter=False,  # the History callback must see a non-finite loss to stop
        save_on_each_node=node_local_storage(),
        **fsdp_arguments(params),
    )


def padding_free(params: Params) -> bool:
    setting = params.train.padding_free
    if setting == "auto":
        return (params.model.attn_implementation == "flash_attention_2"
                and params.model.task == "causal_lm" and params.peft.method not in PROMPT_LEARNING)
    return setting


def _collator(params: Params, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, DataCollatorWithPadding

    if params.model.task == "sequence_classification":
        return DataCollatorWithPadding(tokenizer, padding="longest")
    if padding_free(params):
        # Labels at each example's first token become -100, so no example is trained to
        # predict the next one's start.
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    # Pads each batch to its own longest row, never to max_length.
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest")


def check_padding_free(model, rows, dtype: str) -> float:
    """Refuses padding-free training on a model whose attention leaks across packed examples.

    Runs a few training rows one by one and packed into one sequence; a model that derives its
    attention mask from the restarting position ids gives the same logits both ways. Returns
    the relative difference seen."""
    import torch

    from transformers import DataCollatorWithFlattening

    examples = [{"input_ids": r["input_ids"]} for r in rows]
    packed = DataCollatorWithFlattening(return_tensors="pt")(examples)
    # The model stays in training mode (bitsandbytes repacks 4-bit weights for CPU inference
    # in eval mode) with only its dropout layers off, so both passes are the same function.
    was_training = model.training
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m in dropouts:
        m.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            together = model(input_ids=packed["input_ids"].to(device),
                             position_ids=packed["position_ids"].to(device)).logits[0].float()
            apart = torch.cat([model(input_ids=torch.tensor([e["input_ids"]], device=device)).logits[0]
                               for e in examples]).float()
    finally:
        model.train(was_training)
    diff = ((together - apart).abs().max() / apart.abs().max().clamp_min(1e-6)).item()
    if diff > PACKING_RTOL[dtype]:
        raise PipelineError(
            f"train.padding_free is true but this model's attention ({model.config.model_type}, "
            f"{model.config._attn_implementation}) lets packed examples see each other (logits "
            f"differ by {diff:.2g} relative): this architecture does not build its attention mask "
            "from position ids; set train.padding_free: false")
    log.info("padding-free check: packed and separate logits agree (relative difference %.2g)", diff)
    return diff


def load_tokenized(ws: Workspace):
    """tokenize's DatasetDict, its metadata and tokenizer files checked first: datasets and
    tokenizers stop on a damaged one with a traceback (or a bare KeyError)."""
    import datasets

    recover = "rerun `dvc repro tokenize`"
    index = ws.tokenized / "dataset_dict.json"
    splits = read_json_state(index, required={"splits": list}, recover=recover)["splits"]
    if "train" not in splits or not all(isinstance(s, str) for s in splits):
        raise damaged(index, f"lists the splits {splits}, not tokenize's train (and validation)", recover)
    read_json_folder(ws.tokenized, recover=recover, required={
        f"{split}/{name}": keys for split in splits
        for name, keys in (("state.json", {"_data_files": list}), ("dataset_info.json", {}))})
    try:
        return datasets.load_from_disk(str(ws.tokenized))
    except (OSError, ValueError) as err:  # pyarrow on a cut-short or overwritten .arrow file
        if environment_errno(err) is not None:
            raise
        raise damaged(ws.tokenized, f"a data file cannot be read ({err})", recover) from None


def build_trainer(params: Params, ws: Workspace, history: list[dict[str, Any]],
                  evals: list[dict[str, Any]] | None = None):
    """The model, data and Trainer of the train stage (also what bench/ measures)."""
    from transformers import EarlyStoppingCallback, Trainer, set_seed

    params = with_checkpointing(params)  # run() passes it resolved; bench/ callers may not
    name = run_name("train")
    report_to, callbacks = trackers(params, name, ws)  # first: a missing package fails before loading
    set_seed(params.train.seed)
    data = load_tokenized(ws).remove_columns("id")
    t = params.train
    if t.eval_steps is not None and len(data.get("validation") or []) == 0:
        raise PipelineError(f"train.eval_steps is {t.eval_steps} but the data has no validation rows: "
                            "set data.split.validation_size above 0 (or give validation files), "
                            "or train.eval_steps: null")
    tokenizer = load_tokenizer(params.model, str(ws.tokenizer))
    model = _model(params, tokenizer)
    callbacks += [_history_callback(history, evals), _progress_callback(ws)]
    if t.eval_steps is not None:
        callbacks.append(_save_best_callback())
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    if params.peft.method == "adalora":
        callbacks.append(adalora_callback())
    trainer_class = sharded_trainer(Trainer) if t.fsdp else Trainer
    return trainer_class(
        model=model, args=training_arguments(params, str(ws.checkpoints), report_to, name),
        train_dataset=data["train"], eval_dataset=data.get("validation"),
        data_collator=_collator(params, tokenizer),
        processing_class=tokenizer, callbacks=callbacks,
    )


def launch(params: Params, params_file: Path) -> int:
    """Runs `finetune train` as train.num_processes data-parallel processes on this node, with
    the other train.num_nodes - 1 nodes met at the rendezvous (torch's elastic launcher, what
    torchrun is), and returns the exit code: 2 when a process stopped on a user error (it has
    printed the message), 1 for anything else."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    t = params.train
    meeting = rendezvous(t.num_nodes)
    # A failed process has printed its own message; the agent's summary of it adds nothing.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    log.info("launching %d training processes (%s)%s", t.num_processes, "nccl" if device() == "cuda" else "gloo",
             f" on this node, one of {t.num_nodes} meeting at {meeting.endpoint} (id {meeting.run_id})"
             if t.num_nodes > 1 else "")
    config = LaunchConfig(min_nodes=t.num_nodes, max_nodes=t.num_nodes, nproc_per_node=t.num_processes,
                          run_id=meeting.run_id, rdzv_backend=meeting.backend, rdzv_endpoint=meeting.endpoint,
                          rdzv_configs={"join_timeout": meeting.timeout_s}, max_restarts=0,
                          local_addr=meeting.local_addr)
    try:
        elastic_launch(config, entrypoint=sys.executable)(
            "-m", "tasks.cli", "train", "--params", str(params_file))
    except ChildFailedError as err:
        codes = {f.exitcode for f in err.failures.values()}
        return 2 if 2 in codes else 1
    except RendezvousTimeoutError:
        raise PipelineError(meeting.timed_out(t.num_nodes)) from None
    except RendezvousConnectionError:
        if (message := meeting.unreachable()) is not None:
            raise PipelineError(message) from None
        raise PipelineError(f"lost the rendezvous at {meeting.endpoint} mid-run (the node hosting it died, "
                            f"or the network failed): {RERUN_EVERY_NODE}") from None
    return 0


# What gloo and NCCL say when a peer went away (torch raises them as RuntimeError or DistError).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "remote process exited or there was a network error", "NCCL communicator was aborted")
PEER_ERROR_CHARS = 200
RERUN_EVERY_NODE = "rerun `finetune train` on every node: it resumes from the last checkpoint in artifacts/checkpoints/"


def lost_peer(err: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(err, getattr(dist, "DistNetworkError", ())) or any(m in str(err) for m in PEER_LOST)


def _check_world(params: Params, args) -> None:
    t = params.train
    if args.world_size != t.world_size:
        where = f"train.num_processes is {t.num_processes}" + (
            f" on each of train.num_nodes {t.num_nodes}" if t.num_nodes > 1 else "")
        raise PipelineError(f"{where} but this run has {args.world_size} processes (WORLD_SIZE): "
                            "the effective batch would differ from params.yaml; run `finetune "
                            "train` without a launcher")


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    import torch

    from tasks.memory import preflight
    from tasks.modeling import compute_dtype, load_config

    check_checkpoints(ws.checkpoints)
    config = load_config(params)
    dtype = str(compute_dtype(params)).removeprefix("torch.")
    resolved = with_checkpointing(params)  # params itself stays the checkpoints' fingerprint
    estimate = preflight(resolved, config, dtype, device(), ws.checkpoints)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    trainer = build_trainer(resolved, ws, history, evals)
    _check_world(params, trainer.args)
    with trainer.args.main_process_first(desc="checkpoint check"), writing(ws.checkpoints):
        resume = _resume_checkpoint(params, ws)
    logged, evaluated, resumed_at = _logged_before(resume)
    history.extend(logged)
    evals.extend(evaluated)
    model, tokenizer = trainer.model, trainer.processing_class
    trainable, total = _parameter_counts(model)
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    if padding_free(params):
        rows = trainer.train_dataset.select(range(min(PACKING_CHECK_ROWS, len(trainer.train_dataset))))
        check_padding_free(model, rows, dtype)
    try:
        # Checkpoints are written in place (a partial one is dropped on resume): name their
        # folder when the disk fills up anyway.
        with tracked(params, trainer.args):
            with writing(ws.checkpoints):
                result = trainer.train(resume_from_checkpoint=resume)
            eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None
    except torch.cuda.OutOfMemoryError:
        raise PipelineError(f"CUDA out of memory: {lower_training_memory(params.peft.full_finetune)}") from None
    except RuntimeError as err:
        if params.train.world_size > 1 and lost_peer(err):
            raise PipelineError(
                f"lost another training process mid-run (its node or process died, or the network "
                f"between them failed): {str(err).splitlines()[0][:PEER_ERROR_CHARS]}; {RERUN_EVERY_NODE}") from None
        raise
    gathered = full_state_dict(trainer, node_local_storage())  # with train.fsdp: every process sends its shard
    if not (trainer.is_local_process_zero() if node_local_storage() else trainer.is_world_process_zero()):
        return {}  # the first process (of each node, with node-local storage) writes the outputs
    with atomic_path(ws.adapter) as tmp:
        if params.peft.full_finetune and hasattr(config, "use_cache"):
            model.config.use_cache = config.use_cache  # off only while training (trainable_base)
        model.save_pretrained(tmp, state_dict=gathered)
        if not params.peft.full_finetune:
            normalize_adapter_config(tmp)
        save_tokenizer(tokenizer, tmp)
    t, state = params.train, trainer.state
    if t.eval_steps is None and eval_loss is not None:
        evals.append({"step": result.global_step, "eval_loss": eval_loss})  # the last step's model
    # The checkpoint the Trainer loaded at the end: the adapter saved above holds its weights.
    best = Path(state.best_model_checkpoint) if t.eval_steps is not None and state.best_model_checkpoint else None
    metrics = {"train_loss": _train_loss(history, result, resumed_at), "final_loss": history[-1]["loss"] if history else None,
               "eval_loss": eval_loss, "steps": result.global_step,
               "best_step": int(best.name.rsplit("-", 1)[1]) if best else None,
               "best_metric": state.best_metric if best else None,
               "stopped_early": t.early_stopping_patience is not None and result.global_step < state.max_steps,
               "tokens_seen": trainer.state.num_input_tokens_seen,
               "trainable_params": trainable, "total_params": total,
               "estimated_peak_memory_gib": estimate["total"]}
    with atomic_path(ws.train_log) as tmp:
        tmp.write_text(_log_table(history, evals))
    with atomic_path(ws.eval_log) as tmp:
        tmp.write_text("".join(["step\teval_loss\n", *(f"{e['step']}\t{e['eval_loss']}\n" for e in evals)]))
    write_json(ws.metrics("train"), metrics)
    try:
        clear_checkpoints(ws.checkpoints)
    except OSError as err:  # the adapter is saved: what is left costs disk, not the run
        log.warning("could not remove the checkpoints in %s (%s): remove them by hand", ws.checkpoints, err)
    log.info("%s saved to %s: %s", "model" if params.peft.full_finetune else "adapter", ws.adapter, metrics)
    return metrics
