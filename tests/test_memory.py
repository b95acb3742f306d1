"""Memory preflight: the estimate's arithmetic and the refusal message."""

import pytest
from transformers import LlamaConfig

from tasks.config import parse_params
from tasks.errors import PipelineError
from tasks.memory import (GIB, available_memory, check_fits, check_memory, checkpoint_disk, config_sizes,
                          estimate, impossible_sizes, merged_disk, preflight, shape, total_memory,
                          with_checkpointing)

from .conftest import merge, shipped_params

# Llama-3.1-8B's shape; meta-device instantiation needs no weights.
LLAMA_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8)


def params(**over):
    return parse_params(merge(shipped_params(), over), "p")


def test_qlora_estimate_for_an_8b_model():
    est = estimate(params(tokenize={"max_length": 2048}, train={"per_device_train_batch_size": 1}),
                   LLAMA_8B, "bfloat16")
    assert 5.0 < est["base_weights"] < 5.6  # ~7B linear weights in NF4 + 1B of embeddings in bf16
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"), abs=1e-3)


def test_4bit_base_is_about_a_quarter_of_bf16():
    quantized = estimate(params(), LLAMA_8B, "bfloat16")["base_weights"]
    full = estimate(params(quant={"load_in_4bit": False}, export={"merge_into": "original"}),
                    LLAMA_8B, "bfloat16")["base_weights"]
    assert 0.25 < quantized / full < 0.40


def test_rank_and_batch_move_the_right_parts():
    small = estimate(params(lora={"r": 8}), LLAMA_8B, "bfloat16")
    big = estimate(params(lora={"r": 64}, train={"per_device_train_batch_size": 16}), LLAMA_8B, "bfloat16")
    assert big["trainable_and_optimizer"] == pytest.approx(8 * small["trainable_and_optimizer"], rel=1e-2)
    assert big["logits"] == pytest.approx(2 * small["logits"], rel=1e-3)
    assert big["base_weights"] == small["base_weights"]


def test_fsdp_counts_each_process_share_of_weights_and_optimizer():
    """Full fine-tuning of an 8B model on 8 processes: each keeps an eighth of the weights,
    gradients and optimizer state, plus two whole blocks at a time; the activations are its
    own batch's, as without sharding."""
    full = {"quant": {"load_in_4bit": False}, "export": {"merge_into": "original"}, "peft": {"method": "none"}}
    whole = estimate(params(**full, train={"num_processes": 8}), LLAMA_8B, "bfloat16")
    shard = estimate(params(**merge(full, {"train": {"num_processes": 8, "fsdp": True}})), LLAMA_8B, "bfloat16")
    assert shard["trainable_and_optimizer"] == pytest.approx(whole["trainable_and_optimizer"] / 8, rel=1e-3)
    assert shard["activations"] == whole["activations"]
    block_gib = 2 * 218e6 * 2 / GIB  # two of the 32 blocks (about 218M parameters each) in bf16
    assert shard["gathered_blocks"] == pytest.approx(block_gib, rel=0.1)
    assert whole["total"] > 120 > shard["total"] + 100  # ~130 GiB whole, ~16 GiB as an eighth
    assert shard["total"] == pytest.approx(sum(v for k, v in shard.items() if k != "total"), abs=1e-3)


def test_refuses_when_the_estimate_exceeds_the_device():
    check_fits(7.9, 8.0)
    with pytest.raises(PipelineError, match=r"needs about 9.0 GiB but the GPU has 8.0 GiB free: lower"):
        check_fits(9.0, 8.0)


def test_disk_estimates_for_an_8b_model():
    counts = shape(params(), LLAMA_8B)
    float32 = merged_disk(params(), counts)
    assert 29 < float32 / GIB < 31  # 8.03B parameters, 4 bytes each
    assert merged_disk(params(export={"torch_dtype": "bfloat16"}), counts) == float32 // 2
    checkpoints = checkpoint_disk(params(), counts)  # r=16 on every linear layer: ~42M parameters
    assert 1.2 < checkpoints / GIB < 2.0
    assert checkpoint_disk(params(train={"save_total_limit": 1}), counts) < checkpoints


def test_export_refuses_more_than_the_available_host_memory():
    """Against this machine's real MemAvailable (the disk side is tested on a real full
    filesystem in test_adversarial.py)."""
    available = available_memory()
    if available is None:
        pytest.skip("no /proc/meminfo on this system")
    check_memory("export", available // 2, "merging the model in float32", "set export.torch_dtype: bfloat16")
    with pytest.raises(PipelineError, match=r"^export: merging the model in float32 needs about [\d.]+ GiB of "
                       r"host memory but [\d.]+ GiB is available \(MemAvailable\): free memory, or set "
                       r"export.torch_dtype: bfloat16$"):
        check_memory("export", 2 * available, "merging the model in float32", "set export.torch_dtype: bfloat16")


@pytest.mark.parametrize("over, estimated, expected", [
    ({}, True, False),  # the quickstart's activations are a sliver of any host's memory
    ({"train": {"gradient_checkpointing": True}}, True, True),
    ({"train": {"gradient_checkpointing": False}}, True, False),
    ({"peft": {"method": "prefix_tuning"}}, True, False),  # PEFT cannot checkpoint a KV-cache prefix
    ({}, False, True),  # align: no estimate for DPO, so auto keeps memory safe
])
def test_gradient_checkpointing_auto_resolves(over, estimated, expected):
    assert params(**over).train.gradient_checkpointing == over.get("train", {}).get("gradient_checkpointing", "auto")
    assert with_checkpointing(params(**over), estimated).train.gradient_checkpointing is expected


def test_gradient_checkpointing_auto_turns_on_when_activations_would_crowd_memory(tmp_path):
    """An 8B shape (config only, no weights) at 4096 tokens and a batch of 16: tens of GiB of
    activations without checkpointing, more than half of the memory of any machine that runs
    this suite."""
    LLAMA_8B.save_pretrained(tmp_path)
    big = params(tokenize={"max_length": 4096}, train={"per_device_train_batch_size": 16})
    # past the models/ rule, which is about what DVC tracks, not about the estimate
    big = big.model_copy(update={"model": big.model.model_copy(update={"name_or_path": str(tmp_path)})})
    assert with_checkpointing(big).train.gradient_checkpointing is True


def test_cpu_preflight_refuses_more_than_the_host_memory(tmp_path):
    """On a GPU the estimate is checked against the free memory; on a CPU it was only logged,
    so a batch no host holds trained on until the kernel killed it."""
    if total_memory() is None:
        pytest.skip("no /proc/meminfo on this system")
    small = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2)
    preflight(params(), small, "float32", "cpu", tmp_path)
    with pytest.raises(PipelineError, match=r"^training needs about [\d.]+ GiB but this host has [\d.]+ GiB "
                       r"of memory \(MemTotal\): lower train\.per_device_train_batch_size"):
        preflight(params(train={"per_device_train_batch_size": 10**7}), small, "float32", "cpu", tmp_path)


@pytest.mark.parametrize("config", [
    {"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 320},  # Llama, BERT
    {"d_model": 32, "num_layers": 2, "vocab_size": 320},  # T5
    {"text_config": {"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 320}},  # multimodal
])
def test_check_reads_the_shape_from_config_json_without_torch(tmp_path, config):
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    sizes = config_sizes(tmp_path)
    assert (sizes.hidden_size, sizes.num_hidden_layers, sizes.vocab_size) == (32, 2, 320)
    (tmp_path / "config.json").write_text("{}")
    assert config_sizes(tmp_path) is None


def test_impossible_sizes_need_a_local_model_shape():
    hub = params(model={"name_or_path": "org/model", "revision": "v1"},
                 train={"per_device_train_batch_size": 10**9})
    assert impossible_sizes(hub) == []  # no config.json to read: the GPU or CPU preflight decides



LLAMA_1B = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)


@pytest.mark.parametrize("config, batch, measured_gib", [(LLAMA_1B, 4, 30.45), (LLAMA_8B, 2, 43.30)])
def test_no_checkpointing_estimate_is_within_a_quarter_of_the_h200_peaks(config, batch, measured_gib):
    """Peaks measured on an H200 by bench/gpu.py (BENCHMARKS.md, "GPU check"), QLoRA at 2048
    tokens without gradient checkpointing: the estimate auto-checkpointing decides by."""
    p = params(tokenize={"max_length": 2048},
               train={"per_device_train_batch_size": batch, "gradient_checkpointing": False})
    assert 0.8 < measured_gib / estimate(p, config, "bfloat16")["total"] < 1.25


def test_full_fine_tuning_counts_every_weight_with_its_optimizer_state():
    full = params(peft={"method": "none"}, quant={"load_in_4bit": False}, export={"merge_into": "original"})
    counts = shape(full, LLAMA_8B)
    assert counts.trainable == counts.total
    est = estimate(full, LLAMA_8B, "bfloat16", counts)
    # 8.03B parameters x 16 bytes (fp32 weight, gradient, AdamW's two moments): ~120 GiB; no
    # frozen base besides them.
    assert est["base_weights"] == 0
    assert 119 < est["trainable_and_optimizer"] < 121
    lora = estimate(params(quant={"load_in_4bit": False}, export={"merge_into": "original"}), LLAMA_8B, "bfloat16")
    assert est["activations"] == lora["activations"] and est["logits"] == lora["logits"]
    # Each checkpoint holds every weight and both moments (12 bytes each), plus the saved model.
    assert 8 * 12 * 3 < checkpoint_disk(full, counts) / GIB < 8 * 12 * 3 + 8 * 4 + 10
    with pytest.raises(PipelineError, match=r"or train an adapter \(peft.method lora, with quant.load_in_4bit: "
                                            r"true\): full fine-tuning \(peft.method none\) holds every weight"):
        check_fits(9.0, 8.0, full=True)
