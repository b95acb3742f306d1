"""ROUGE through the evaluate API equals rouge_score's; `finetune score` prints the same."""

import json

import pytest
from rouge_score import rouge_scorer

from tasks.cli import main
from tasks.scoring import ROUGE_TYPES, score

PREDICTIONS = ["the cats are sitting on the mat", "hello world", "a completely different text",
               "Anna and Ben will go hiking on Saturday."]
REFERENCES = ["the cat sat on the mat", "hello there world", "nothing in common here",
              "Anna and Ben will go hiking on Sunday. They meet at 9."]


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_equals_rouge_score(use_stemmer):
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    ours = score(PREDICTIONS, REFERENCES, use_stemmer=use_stemmer, bootstrap_samples=200)
    for t in ROUGE_TYPES:
        expected = sum(scorer.score(r, p)[t].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / 4
        assert ours[t]["mean"] == pytest.approx(expected, abs=1e-6)
        assert ours[t]["ci_low"] <= ours[t]["mean"] <= ours[t]["ci_high"]
    assert ours["num_examples"] == 4


def test_stemming_matters():
    stemmed = score(["cats sitting"], ["cat sits"], use_stemmer=True, bootstrap_samples=10)
    plain = score(["cats sitting"], ["cat sits"], use_stemmer=False, bootstrap_samples=10)
    assert stemmed["rouge1"]["mean"] == 1.0 and plain["rouge1"]["mean"] == 0.0


def test_cli_score_txt_and_jsonl(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PREDICTIONS) + "\n")
    (tmp_path / "r.txt").write_text("\n".join(REFERENCES) + "\n")
    assert main(["score", "--predictions", str(tmp_path / "p.txt"),
                 "--references", str(tmp_path / "r.txt")]) == 0
    from_txt = json.loads(capsys.readouterr().out)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PREDICTIONS))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in REFERENCES))
    assert main(["score", "--predictions", str(tmp_path / "p.jsonl"),
                 "--references", str(tmp_path / "r.jsonl"), "--field", "text"]) == 0
    assert json.loads(capsys.readouterr().out) == from_txt == score(PREDICTIONS, REFERENCES)


def test_cli_score_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a\nb\n")
    (tmp_path / "r.txt").write_text("a\n")
    assert main(["score", "--predictions", str(tmp_path / "p.txt"),
                 "--references", str(tmp_path / "r.txt")]) == 2
    assert "2 predictions but 1 references" in capsys.readouterr().err
    assert main(["score", "--predictions", str(tmp_path / "p.jsonl"),
                 "--references", str(tmp_path / "r.txt")]) == 2
    assert "file not found" in capsys.readouterr().err


# Three references per prediction; the best one differs by example and by ROUGE type.
MULTI = [[r, "the mat has a cat on it", "world"] for r in REFERENCES]


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_several_references_equal_rouge_scores_score_multi(use_stemmer):
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    ours = score(PREDICTIONS, MULTI, use_stemmer=use_stemmer, bootstrap_samples=50)
    single = score(PREDICTIONS, REFERENCES, use_stemmer=use_stemmer, bootstrap_samples=50)
    for t in ROUGE_TYPES:
        expected = sum(scorer.score_multi(refs, p)[t].fmeasure for p, refs in zip(PREDICTIONS, MULTI)) / 4
        assert ours[t]["mean"] == pytest.approx(expected, abs=1e-6)
    assert ours["rouge1"]["mean"] > single["rouge1"]["mean"]  # the extra references were used


def test_one_reference_in_a_list_changes_nothing():
    assert score(PREDICTIONS, [[r] for r in REFERENCES]) == score(PREDICTIONS, REFERENCES)


def test_cli_score_several_references(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PREDICTIONS) + "\n")
    for k in range(3):
        (tmp_path / f"r{k}.txt").write_text("\n".join(refs[k] for refs in MULTI) + "\n")
    assert main(["score", "--predictions", str(tmp_path / "p.txt"),
                 "--references", *(str(tmp_path / f"r{k}.txt") for k in range(3))]) == 0
    from_files = json.loads(capsys.readouterr().out)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prediction": p}) + "\n" for p in PREDICTIONS))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"summary": refs}) + "\n" for refs in MULTI))
    assert main(["score", "--predictions", str(tmp_path / "p.jsonl"), "--prediction-field", "prediction",
                 "--references", str(tmp_path / "r.jsonl"), "--reference-field", "summary"]) == 0
    assert json.loads(capsys.readouterr().out) == from_files == score(PREDICTIONS, MULTI)
    (tmp_path / "short.txt").write_text("x\n")
    assert main(["score", "--predictions", str(tmp_path / "p.txt"), "--references",
                 str(tmp_path / "r0.txt"), str(tmp_path / "short.txt")]) == 2
    assert "the --references files differ in length" in capsys.readouterr().err
