"""Errors a user can cause, faults that must not lose work, and what must never run:
atomic outputs, token hygiene, pickle and remote-code refusal, context length, fuzzing."""

from __future__ import annotations

import logging
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import templates
from tasks.config import parse_params
from tasks.errors import ConfigError, PipelineError, TemplateError
from tasks.io import RedactingFormatter, atomic_path

from .conftest import merge, shipped_params


def test_failed_block_leaves_no_output(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "half-written").write_text("x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_successful_block_replaces_old_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_token_in_params_is_refused_with_a_pointer_to_the_environment():
    with pytest.raises(ConfigError) as info:
        parse_params(merge(shipped_params(), {"model": {"token": "hf_abc"}}), "params.yaml")
    [problem] = info.value.problems
    assert problem.startswith("model.token: tokens never go in params") and "HF_TOKEN" in problem


def test_token_is_redacted_from_logs(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETSECRET")
    record = logging.LogRecord("finetune", logging.INFO, __file__, 1,
                               "loading with hf_SECRETSECRET", None, None)
    assert "hf_SECRETSECRET" not in RedactingFormatter("%(message)s").format(record)


@pytest.fixture
def tiny_ws(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "models/tiny")
    return tmp_path


def tiny_params(**over):
    return parse_params(merge(shipped_params(), merge({"model": {"name_or_path": "models/tiny"}}, over)), "p")


def test_pickle_weights_are_refused_unless_allowed(tiny_ws):
    import torch
    from safetensors.torch import load_file

    from tasks.modeling import load_base

    model_dir = tiny_ws / "models/tiny"
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match="only safetensors weights are loaded"):
        load_base(tiny_params(), quantized=False)
    assert load_base(tiny_params(model={"allow_pickle_weights": True}), quantized=False) is not None


def test_trust_remote_code_is_off_by_default_and_logged_when_on(tiny_ws, caplog):
    from tasks.modeling import load_tokenizer

    assert tiny_params().model.trust_remote_code is False
    with caplog.at_level(logging.WARNING, logger="finetune"):
        load_tokenizer(tiny_params(model={"trust_remote_code": True}).model)
    assert "trust_remote_code is ON" in caplog.text


def test_max_length_past_the_models_context(tiny_ws):
    from tasks.modeling import load_base

    with pytest.raises(PipelineError, match=r"tokenize.max_length \(2048\) is past the model's context of 1024"):
        load_base(tiny_params(tokenize={"max_length": 2048}), quantized=False)


values = st.one_of(st.text(), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                   st.lists(st.text(), max_size=2), st.dictionaries(st.text(), st.text(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(template=st.text(alphabet=st.sampled_from(list("{}ab_._[]!:0 _x")), max_size=24) | st.text(),
       record=st.dictionaries(st.sampled_from(["a", "b", "x", "ab", "_"]), values, max_size=4))
def test_fuzz_templates_render_or_fail_cleanly(template, record):
    try:
        out = templates.fill(template, record, "record 1")
    except TemplateError:
        return
    assert isinstance(out, str)


@settings(max_examples=200, deadline=None)
@given(record=st.dictionaries(st.sampled_from(["id", "dialogue", "summary", "other"]), values, max_size=4))
def test_fuzz_prepare_records_become_examples_or_bad_records(record):
    from tasks import records

    params = parse_params(shipped_params(), "p")
    tpl = templates.resolve(params.prompt.template, params.prompt.completion)
    try:
        example = records.to_example(params, tpl, None, "line 1", record)
    except records.BadRecord as err:
        assert err.reason in {"missing_field", "wrong_type", "empty_completion"}
        return
    # A list in the completion field is several references (multi-reference ROUGE).
    expected = {"prompt", "completion"} | ({"references"} if isinstance(record.get("summary"), list) and record["summary"] else set())
    assert set(example) == expected and example["completion"].strip()
    assert all(isinstance(r, str) for r in example.get("references", []))


def test_prefect_server_binds_to_loopback_by_default():
    from prefect.settings import get_current_settings

    assert get_current_settings().server.api.host == "127.0.0.1"


def test_push_is_skipped_offline_and_refused_without_a_token(tmp_path):
    """`finetune push` never uploads with HF_HUB_OFFLINE set, needs HF_TOKEN otherwise, and
    a failed upload ends in one line that does not show the token."""
    import json
    import subprocess

    from huggingface_hub import constants

    from . import conftest
    from .conftest import FAKE_HF_TOKEN, env, finetune

    exported = tmp_path / "artifacts/merged"
    exported.mkdir(parents=True)
    (exported / "README.md").write_text("# card\n")
    (exported / "manifest.json").write_text(json.dumps({"params_sha256": "ab" * 32}))

    def push(*extra: str, **environ: str | None) -> subprocess.CompletedProcess[str]:
        """`finetune push` in this process (conftest.finetune) with the test environment plus
        `environ`, where None unsets a variable, as a shell would give it to a fresh process."""
        unset = {k for k, v in environ.items() if v is None}
        effective = {k: v for k, v in {**env(), **environ}.items() if k not in unset}
        with pytest.MonkeyPatch.context() as mp:
            for key in unset:
                mp.delenv(key, raising=False)
            mp.setattr(conftest, "env", lambda: {k: v for k, v in env().items() if k not in unset})
            # huggingface_hub reads HF_HUB_OFFLINE once, on import; a fresh process would
            # read this one (with it still on, the upload would fail without trying the network).
            mp.setattr(constants, "HF_HUB_OFFLINE", constants._is_true(
                effective.get("HF_HUB_OFFLINE") or effective.get("TRANSFORMERS_OFFLINE")))
            return finetune(tmp_path, "push", "--repo-id", "org/model", *extra,
                            extra_env={k: v for k, v in environ.items() if v is not None})

    offline = push(HF_HUB_OFFLINE="1")
    assert offline.returncode == 0 and json.loads(offline.stdout) == {"pushed": False, "reason": "offline"}
    assert "not pushing artifacts/merged to org/model" in offline.stderr

    no_token = push(HF_HUB_OFFLINE="0", HF_TOKEN=None)
    assert no_token.returncode == 2 and "set HF_TOKEN" in no_token.stderr

    not_exported = push("--folder", "nowhere", HF_HUB_OFFLINE="1")
    assert not_exported.returncode == 2 and "not an exported model" in not_exported.stderr

    # No network here: the upload itself fails, with the reason and without the token.
    failed = push(HF_HUB_OFFLINE="0")
    assert failed.returncode == 2 and "push to org/model failed" in failed.stderr
    assert FAKE_HF_TOKEN not in failed.stdout + failed.stderr and "Traceback" not in failed.stderr
