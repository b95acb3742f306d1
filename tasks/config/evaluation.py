"""What happens after training: evaluate.* (scoring), export.* (the merge) and promote.* (release)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tasks.config.base import LM_EVAL_DIR, Section


class EvaluateConfig(Section):
    # Generation settings, shared with export's re-scoring:
    max_new_tokens: int = Field(48, ge=1, description=(
        "Generation length in tokens (generative tasks), also used by export. For causal_lm it "
        "must be below tokenize.max_length: prompt and answer share the sequence."))
    per_device_eval_batch_size: int = Field(16, ge=1, description=(
        "Generation batch, also used by export and finetune predict."))
    max_samples: int | None = Field(None, ge=1, description=(
        "Score only the first N test rows; null: all. Also used by export."))
    # Scoring settings, read by evaluate only:
    use_stemmer: bool = Field(True, description=(
        "ROUGE with Porter stemming, as rouge_score and most papers do."))
    bootstrap_samples: int = Field(1000, ge=10, description=(
        "Resamples for the percentile-bootstrap confidence intervals (at least 10); promote "
        "uses them too."))
    confidence_level: float = Field(0.95, gt=0, lt=1, description=(
        "Confidence level of the bootstrap intervals, in (0, 1)."))
    seed: int = Field(0, description="Bootstrap seed: the same inputs give the same intervals.")
    preview_rows: int = Field(5, ge=0, description=(
        "Predictions shown in reports/eval_preview.md."))
    # The general-capability check, read by evaluate only (off while lm_eval_tasks is []):
    lm_eval_tasks: list[str] = Field([], description=(
        "EleutherAI lm-evaluation-harness tasks run on the base and on the tuned model (adapter "
        "attached) to catch forgetting (metrics/lm_eval.json; promote.max_regression gates on "
        "it): harness task or group names (e.g. hellaswag, arc_easy: their data comes from the "
        "Hugging Face Hub) or paths of task YAMLs under data/lm_eval/ (local data, offline). "
        "[]: off."))
    lm_eval_limit: int | None = Field(None, ge=1, description=(
        "Score only the first N items of each harness task (the harness's `limit`); null: all."))
    lm_eval_num_fewshot: int | None = Field(None, ge=0, description=(
        "Few-shot examples in each harness prompt (the harness's `num_fewshot`); null: each "
        "task's own default (0 where it sets none)."))

    @field_validator("lm_eval_tasks")
    @classmethod
    def _lm_eval_tasks(cls, specs: list[str]) -> list[str]:
        problems = []
        for spec in specs:
            if not spec.endswith((".yaml", ".yml")):
                continue  # a harness task name, checked by the harness when evaluate runs
            p = Path(spec)
            if p.is_absolute() or ".." in p.parts or p.parts[:2] != LM_EVAL_DIR.parts:
                problems.append(f"{spec!r}: a task YAML must be under {LM_EVAL_DIR}/ (dvc.yaml "
                                "tracks that folder)")
        if len(set(specs)) != len(specs):
            problems.append("a task is listed twice")
        if problems:
            raise ValueError("\n".join(problems))
        return specs


class ExportConfig(Section):
    torch_dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description=(
        "Dtype of the merged model; float16 and bfloat16 take half the disk and memory of "
        "float32 but round the merged weights."))
    merge_into: Literal["dequantized", "original"] = Field("dequantized", description=(
        "Which weights the adapter is merged into: dequantized (the 4-bit weights it was "
        "trained against) or original (the full-precision checkpoint). With dequantized, those "
        "4-bit weights are cast up to torch_dtype, so the merged model reproduces the tuned one "
        "that evaluate scored; original reloads the full-precision checkpoint and merges there "
        "(what most tutorials do; drifts a little). The merge never happens in 4-bit, and both "
        "export checks (logits, metric) must pass before anything is written."))
    check_prompts: int = Field(4, ge=1, description=(
        "Test prompts whose logits are compared, merged model against base + adapter. The "
        "logits are the next token's after the prompt (causal_lm), the decoder's first token's "
        "(seq2seq) or the classes' (classification)."))
    logits_atol: float = Field(1e-3, gt=0, description=(
        "Largest allowed absolute logit difference, merged model against base + adapter."))
    metric_atol: float = Field(0.02, ge=0, description=(
        "Largest allowed |merged - adapter| of the headline metric (ROUGE-L; accuracy for "
        "classification) on the scored test rows; also bounds |GGUF - merged|."))
    gguf: Literal["f32", "f16", "bf16", "q8_0"] | None = Field(None, description=(
        "Also write artifacts/merged/model-<type>.gguf in this tensor type; null: no GGUF. It "
        "goes through llama.cpp's own converter (make gguf-converter), is loaded back with "
        "transformers and re-scored on the test split (metric_atol applies). causal_lm and "
        "merging methods only."))


class PromoteConfig(Section):
    min_gain: float = Field(0.0, description=(
        "Promote the exported model (registry/latest.json) only when it beats the champion by "
        "at least this on the headline metric, on the same test rows. The champion is the model "
        "registry/latest.json points at (the base before anything was promoted), so from the "
        "second run on the margin is over the last promoted model; the headline metric is "
        "ROUGE-L for causal_lm and seq2seq, accuracy for sequence_classification."))
    max_regression: float | None = Field(None, ge=0, description=(
        "Refuse promotion when any task of evaluate.lm_eval_tasks drops by more than this from "
        "the base to the tuned model, in the task's main metric (its first; e.g. acc, 0-1); "
        "null: the scores are reported, not checked."))
    registry: Literal["local", "mlflow"] = Field("local", description=(
        "Where promotions are recorded. local: registry/ (or FINETUNE_REGISTRY) alone. mlflow: "
        "also MLflow's Model Registry at MLFLOW_TRACKING_URI: every run registers its candidate "
        "(the merged model) as a version of promote.mlflow_model, tagged with the git commit, "
        "dvc.lock's hashes, params and scores; the alias challenger moves to it, champion only "
        "when the promotion is applied. The local registry stays the source of truth; MLflow "
        "unreachable fails promote with neither registry changed."))
    mlflow_model: str = Field("finetune", min_length=1, description=(
        "The registered model's name in MLflow (promote.registry: mlflow)."))
    serve_check_rows: int = Field(0, ge=0, description=(
        "Before a promotion is applied, serve the candidate with `finetune serve` (transformers "
        "serve, OpenAI-compatible) and send it this many test prompts: its greedy answers must "
        "equal evaluate's tuned predictions, else the promotion is undone (the champion stays), "
        "metrics/promote.json lists the prompts that differed and the stage fails. 0: no check. "
        "causal_lm and merging methods only (the server runs a standalone decoder)."))
    approval: Literal["auto", "required"] = Field("auto", description=(
        "auto: a challenger that passes the gate is promoted at once. required: it waits for a "
        "person. The Prefect flow pauses with a form (approve or reject, and a note); under "
        "`dvc repro` it waits for `finetune promote --approve` or `--reject`. Until then "
        "registry/latest.json is unchanged and metrics/promote.json says `pending`."))

