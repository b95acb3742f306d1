"""`finetune predict` through the CLI's main (conftest.finetune, in this process) on a trained
tiny workspace: the adapter gives evaluate's own predictions for the same rows, an export and
registry/latest load as standalone models, references are scored as `finetune score` scores
them, and a bad input or model ends in one message with exit 2 and no output."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_PARAMS, copy_workspace, make_workspace, merge, stage
from .conftest import finetune as finetune_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_workspace) -> Path:
    """The session's TINY_PARAMS workspace as it is after evaluate: promote's outputs (and
    export's, which the test that promotes writes again) removed, so nothing is promoted yet."""
    ws = copy_workspace(trained_workspace, tmp_path_factory.mktemp("predict") / "ws")
    for output in ("artifacts/merged", "registry"):
        shutil.rmtree(ws / output, ignore_errors=True)
    for metrics in ("export", "promote"):
        (ws / f"metrics/{metrics}.json").unlink(missing_ok=True)
    # min_gain -1: promote whatever 4 steps of training give, so registry/latest exists. Only
    # promote reads it: the stages run before it are those of TINY_PARAMS.
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump(merge(raw, {"promote": {"min_gain": -1.0}}),
                                                   sort_keys=False))
    return ws


def finetune(ws: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = finetune_in_process(ws, *args)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def evaluated(ws: Path) -> list[dict]:
    return read_jsonl(ws / "reports/predictions.jsonl")


def write_input(ws: Path, name: str = "new.tsv") -> Path:
    """The raw records of the rows evaluate scored, as a TSV file (dialogues hold newlines,
    so the writer quotes them)."""
    wanted = [r["id"] for r in evaluated(ws)]
    raw = {r["id"]: r for r in read_jsonl(ws / "data/raw/dialogues.jsonl")}
    path = ws / "data/raw" / name
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary"], delimiter="\t",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(raw[i] for i in wanted)
    return path


def test_adapter_predicts_what_evaluate_predicted_and_scores_like_finetune_score(trained):
    write_input(trained)
    proc = finetune(trained, "predict", "--input", "data/raw/new.tsv", "--model", "artifacts/adapter",
                    "--output", "out/preds.jsonl", "--references", "summary")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generate: 100%" in proc.stderr  # the progress bar
    result = json.loads(proc.stdout)
    rows = read_jsonl(trained / "out/preds.jsonl")
    expected = evaluated(trained)
    assert [set(r) for r in rows] == [{"id", "prompt", "prediction", "references"}] * len(expected)
    assert [(r["id"], r["prompt"], r["prediction"], r["references"]) for r in rows] == \
        [(e["id"], e["prompt"], e["tuned"], [e["reference"]]) for e in expected]
    assert result["rows"] == len(expected)
    eval_json = json.loads((trained / "metrics/eval.json").read_text())
    assert result["scores"] == eval_json["tuned"]
    scored = finetune(trained, "score", "--predictions", "out/preds.jsonl", "--prediction-field",
                      "prediction", "--references", "out/preds.jsonl",
                      "--reference-field", "references", "--bootstrap-samples", "50")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["rougeL"]["mean"] == result["scores"]["rougeL"]["mean"]
    nothing_promoted = finetune(trained, "predict", "--input", "data/raw/new.tsv", "--model",
                                "registry/latest", "--output", "out/latest.jsonl")
    assert nothing_promoted.returncode == 2
    assert "--model registry/latest: no model was promoted yet" in nothing_promoted.stderr


def test_export_and_registry_latest_load_as_standalone_models(trained):
    write_input(trained, "new2.tsv")
    for name in ("export", "promote"):
        finetune(trained, name, check=True)
    outputs = []
    for model in ("artifacts/merged", "registry/latest"):
        proc = finetune(trained, "predict", "--input", "data/raw/new2.tsv", "--model", model,
                        "--output", f"out/{model.replace('/', '_')}.jsonl")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(read_jsonl(trained / f"out/{model.replace('/', '_')}.jsonl"))
        assert json.loads(proc.stdout)["model"].startswith(model.split("/")[0])
    assert outputs[0] == outputs[1]
    assert [r["id"] for r in outputs[0]] == [e["id"] for e in evaluated(trained)]
    assert all(set(r) == {"id", "prompt", "prediction"} for r in outputs[0])


@pytest.mark.parametrize(("args", "content", "message"), [
    (("--model", "artifacts/nothing"), None, "--model: artifacts/nothing is not a folder"),
    (("--model", "data"), None, "--model: data holds neither an adapter"),
    (("--model", "artifacts/adapter"), b"id\tdialogue\nx1\thi\n",
     "data/raw/bad.tsv line 2: reference field 'summary' is missing"),
    (("--model", "artifacts/adapter"), b"id\ttext\nx1\thi\n",
     "data/raw/bad.tsv line 2: missing field 'dialogue'"),
])
def test_bad_model_or_input_is_one_message(trained, args, content, message):
    if content is not None:
        (trained / "data/raw/bad.tsv").write_bytes(content)
    else:
        write_input(trained, "bad.tsv")
    proc = finetune(trained, "predict", "--input", "data/raw/bad.tsv", *args, "--output", "out/bad.jsonl",
                    "--references", "summary")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == f"finetune predict: error: {message}" or \
        proc.stderr.splitlines()[-1].startswith(f"finetune predict: error: {message}")
    assert not (trained / "out/bad.jsonl").exists()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_bert) -> Path:
    from tasks.config import load_params

    from .conftest import TASK_PARAMS

    ws = make_workspace(tmp_path_factory.mktemp("predict-cls"), tiny_bert,
                        merge(TINY_PARAMS, TASK_PARAMS["sequence_classification"]))
    params = load_params(ws / "params.yaml")
    for name in ("prepare", "tokenize", "train", "evaluate"):
        stage(name, params, ws)
    return ws


def test_classifier_writes_class_and_probabilities(classifier):
    expected = evaluated(classifier)
    raw = {r["id"]: r for r in read_jsonl(classifier / "data/raw/reviews.jsonl")}
    # Integer-coded labels, as many shipped sets have them: read as indexes into model.labels.
    labels = ["negative", "positive"]
    (classifier / "data/raw/new.jsonl").write_text("".join(
        json.dumps({**raw[e["id"]], "label": labels.index(raw[e["id"]]["label"])}) + "\n" for e in expected))
    proc = finetune(classifier, "predict", "--input", "data/raw/new.jsonl", "--model", "artifacts/adapter",
                    "--output", "preds.jsonl", "--references", "label")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "classify: 100%" in proc.stderr
    rows = read_jsonl(classifier / "preds.jsonl")
    assert [r["class"] for r in rows] == [e["tuned"] for e in expected]
    for r in rows:
        assert set(r) == {"id", "prompt", "class", "probabilities", "references"}
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["class"] == max(r["probabilities"], key=r["probabilities"].get)
    result = json.loads(proc.stdout)["scores"]
    assert result == json.loads((classifier / "metrics/eval.json").read_text())["tuned"]


def test_evaluate_scores_each_prediction_against_its_best_reference(trained, tmp_path):
    from tasks.scoring import score

    ws = copy_workspace(trained, tmp_path / "ws")
    tuned = {e["id"]: e["tuned"] for e in evaluated(ws)}
    test = ws / "data/prepared/test.jsonl"
    rows = read_jsonl(test)
    # A second reference equal to the tuned prediction: the best match, where it is not empty.
    for r in rows:
        r["references"] = [r["completion"].strip(), tuned.get(r["id"], "x")]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    single = json.loads((ws / "metrics/eval.json").read_text())["tuned"]
    finetune(ws, "evaluate", check=True)
    got = json.loads((ws / "metrics/eval.json").read_text())["tuned"]
    scored = evaluated(ws)
    assert [e["references"] for e in scored] == [r["references"] for r in rows[:len(scored)]]
    expected = score([e["tuned"] for e in scored], [e["references"] for e in scored], bootstrap_samples=50)
    assert got == expected
    assert got["rouge1"]["mean"] > single["rouge1"]["mean"]


# --- finetune serve -------------------------------------------------------------------------

@pytest.mark.slow
def test_the_served_model_answers_as_evaluate_did_and_stops_on_sigterm(trained_workspace):
    """`finetune serve` on the export: its OpenAI-compatible completions, greedy, are the tuned
    model's predictions in reports/predictions.jsonl; SIGTERM ends it cleanly."""
    import signal
    import socket

    from tasks.serve import complete

    from .conftest import env, wait_until_up

    ws = trained_workspace
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["finetune", "serve", "--model", "artifacts/merged", "--port", str(port)], cwd=ws,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}")
        max_tokens = yaml.safe_load((ws / "params.yaml").read_text())["evaluate"]["max_new_tokens"]
        for row in evaluated(ws)[:3]:
            served = complete(f"http://127.0.0.1:{port}", ws / "artifacts/merged", row["prompt"], max_tokens)
            assert served.strip() == row["tuned"].strip(), row["id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn shuts down (requests finished, the app's shutdown run), then ends by the signal
    # it received, as a shell expects of a process stopped by SIGTERM.
    assert "Application shutdown complete" in err and proc.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert f"serving {ws / 'artifacts/merged'} at http://127.0.0.1:{port}/v1" in err


def test_serve_without_a_champion_or_a_model_says_what_to_give(tmp_path):
    out = finetune(tmp_path, "serve")
    assert out.returncode == 2
    assert "nothing to serve: registry/latest.json names no champion yet (run promote)" in out.stderr
    out = finetune(tmp_path, "serve", "--model", "artifacts/adapter")
    assert out.returncode == 2 and "artifacts/adapter is not a saved model (no config.json)" in out.stderr
