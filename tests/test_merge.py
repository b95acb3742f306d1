"""Merging a LoRA adapter trained on a 4-bit base gives a full-precision model with the
same logits (the rule export relies on), and 4-bit loading really is bitsandbytes NF4."""

import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tasks.config import parse_params
from tasks.modeling import load_base

from .conftest import merge, shipped_params


@pytest.fixture
def params(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "models/tiny")
    return parse_params(merge(shipped_params(), {"model": {"name_or_path": "models/tiny"}}), "p")


def random_adapter(model):
    # init_lora_weights=False: B is random, so the adapter changes the output.
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False, task_type="CAUSAL_LM"))


def test_4bit_base_is_nf4(params):
    import bitsandbytes as bnb

    model = load_base(params, quantized=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" for m in layers)


def test_merge_into_dequantized_base_reproduces_quantized_plus_adapter(params):
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    torch.manual_seed(0)
    quantized = random_adapter(load_base(params, quantized=True))
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits
    adapter_state = {k: v.clone() for k, v in quantized.state_dict().items() if "lora_" in k}

    base = load_base(params, quantized=True).dequantize().to(torch.float32)
    model = random_adapter(base)
    model.load_state_dict(adapter_state, strict=False)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        standalone = model.merge_and_unload()
        merged = standalone(input_ids=ids).logits
    assert not any("lora_" in name for name, _ in standalone.named_parameters())
    assert torch.allclose(unmerged, merged, atol=1e-4)
    assert torch.allclose(expected, merged, atol=1e-3)
    assert not torch.allclose(expected, load_base(params, quantized=True)(input_ids=ids).logits, atol=1e-3)
