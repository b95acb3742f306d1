"""train: SIGKILL mid-run, rerun, and the adapter is byte-identical to an uninterrupted run;
a diverging run stops with a message naming the step.

Real `finetune train` processes only where the process is the point: kill -9 and resume, a
rerun while other processes load every core, the launcher's data-parallel and sharded (FSDP)
processes, several nodes, and a launcher with another process count. The other runs are in
this process."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tasks.config import parse_params

from .conftest import TINY_PARAMS, env, finetune, merge, shipped_params, stage, tokenized_dir

STEPS = 8
KILL_AFTER = "checkpoint-4"
PADDING_FREE_RTOL = 0.01  # train_loss, padding-free vs padded batches
DDP_LOSS_RTOL = 0.05  # train_loss, 2 processes vs 1 (same effective batch, other data order)


def adapter_digest(ws: Path) -> str:
    return hashlib.sha256((ws / "artifacts/adapter/adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the runs in this process (the `finetune train` processes keep
    torch's default): on a busy 2-core host two threads spinning at each barrier made each
    in-process run several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model):
    raw = merge(shipped_params(), merge(TINY_PARAMS, {"train": {"max_steps": STEPS, "save_steps": 2}}))
    return tokenized_dir(tmp_path_factory.mktemp("resume"), tiny_model, raw)


def train(ws: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["finetune", "train", *extra], cwd=ws, env=env(), capture_output=True,
                          text=True, timeout=600)


def variant(ws: Path, name: str, **train_params) -> Path:
    """params.yaml with `train_params` over its train section, written to `name` in `ws`."""
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"].update(train_params)
    (ws / name).write_text(yaml.safe_dump(params))
    return ws / name


def train_metrics(ws: Path, monkeypatch, **train_params) -> dict:
    """metrics/train.json of an in-process run with the workspace's params plus `train_params`."""
    import json

    monkeypatch.chdir(ws)
    params = parse_params(yaml.safe_load(variant(ws, "variant.yaml", **train_params).read_text()), "params.yaml")
    stage("train", params)
    return json.loads((ws / "metrics/train.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(ws) -> dict[str, str]:
    """The adapter digest and the metric files of one `finetune train` process run to the
    end without interference."""
    done = train(ws)
    assert done.returncode == 0, done.stderr
    return {"adapter": adapter_digest(ws), **metric_files(ws)}


def metric_files(ws: Path) -> dict[str, str]:
    return {name: (ws / name).read_text()
            for name in ("metrics/train.json", "metrics/train_log.tsv", "metrics/eval_log.tsv")}


@pytest.fixture(scope="module")
def padded(ws) -> dict:
    """The reference run of the comparisons below: padded batches, random order, one process."""
    with pytest.MonkeyPatch.context() as mp:
        return train_metrics(ws, mp, padding_free=False)


def killed_after_checkpoint(ws: Path, *extra: str) -> Path:
    """Starts `finetune train *extra` and kill -9s it (with the training processes it
    launched) once it has written the KILL_AFTER checkpoint, whose folder it returns."""
    proc = subprocess.Popen(["finetune", "train", *extra], cwd=ws, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = ws / "artifacts/checkpoints" / KILL_AFTER
    deadline = time.monotonic() + 300
    while not (checkpoint / "trainer_state.json").is_file():
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kill_node(proc)
    proc.wait()
    return checkpoint


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_adapter(ws, uninterrupted):
    shutil.rmtree(ws / "artifacts/adapter")
    killed_after_checkpoint(ws)
    assert not (ws / "artifacts/adapter").exists()  # nothing half-written

    resumed = train(ws)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert adapter_digest(ws) == uninterrupted["adapter"]
    # the whole loss log (from step 1) and the whole run's train_loss, as if never killed
    assert metric_files(ws) == {k: v for k, v in uninterrupted.items() if k != "adapter"}
    assert not (ws / "artifacts/checkpoints").exists()


@pytest.mark.slow
def test_forced_retrain_under_cpu_load_is_byte_identical(ws, uninterrupted):
    """A rerun while other processes fight for every core gives the same adapter bytes."""
    import os
    import sys

    shutil.rmtree(ws / "artifacts/adapter", ignore_errors=True)  # the bytes compared are this run's
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 * (os.cpu_count() or 1))]
    try:
        loaded = train(ws)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert loaded.returncode == 0, loaded.stderr
    assert adapter_digest(ws) == uninterrupted["adapter"]


def test_diverging_loss_stops_with_the_step(ws):
    variant(ws, "diverge.yaml", learning_rate=1.0e30)  # overflows float32 within a step or two
    out = finetune(ws, "train", "--params", "diverge.yaml")
    assert out.returncode == 2
    assert "error: training loss is" in out.stderr and "at step" in out.stderr
    assert "Traceback" not in out.stderr


def test_length_grouped_batches_train_to_a_similar_loss(ws, padded, monkeypatch):
    """A throughput feature must not change what is learned beyond noise."""
    baseline = padded["train_loss"]
    grouped = train_metrics(ws, monkeypatch, padding_free=False,
                            train_sampling_strategy="group_by_length")["train_loss"]
    assert abs(grouped - baseline) / baseline < 0.05  # same data, same steps: within 5%


def test_padding_free_batches_train_to_the_same_loss(ws, padded, monkeypatch, caplog):
    """Packing a batch into one row with restarting position ids is the same computation as
    padding it: the same loss up to float rounding."""
    with caplog.at_level(logging.INFO, logger="finetune.train"):
        packed = train_metrics(ws, monkeypatch, padding_free=True)
    assert "padding-free check: packed and separate logits agree" in caplog.text
    assert abs(packed["train_loss"] - padded["train_loss"]) / padded["train_loss"] < PADDING_FREE_RTOL


def test_padding_free_is_refused_where_attention_leaks_across_examples():
    """OPT builds its causal mask without looking at position ids, so packed examples would
    attend to each other: the check must catch that; Llama's must pass."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    from tasks.errors import PipelineError
    from tasks.train import check_padding_free

    rows = [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12]}, {"input_ids": [13, 14]}]
    small = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**small, intermediate_size=64, use_cache=False))
    assert check_padding_free(llama, rows, "float32") < 1e-5
    opt = AutoModelForCausalLM.from_config(OPTConfig(**small, ffn_dim=64, word_embed_proj_dim=32,
                                                     use_cache=False))
    with pytest.raises(PipelineError, match="train.padding_free: false"):
        check_padding_free(opt, rows, "float32")


@pytest.fixture(scope="module")
def two_processes(ws, tmp_path_factory) -> tuple[dict, Path]:
    """train.num_processes: 2 on one node, with the per-process batch halved: its metrics and
    a copy of its adapter."""
    import json

    batch = yaml.safe_load((ws / "params.yaml").read_text())["train"]["per_device_train_batch_size"]
    variant(ws, "two.yaml", padding_free=False, num_processes=2, per_device_train_batch_size=batch // 2)
    launched = train(ws, "--params", "two.yaml")
    assert launched.returncode == 0, launched.stderr
    assert "launching 2 training processes (gloo)" in launched.stderr
    kept = tmp_path_factory.mktemp("two-processes") / "adapter"
    shutil.copytree(ws / "artifacts/adapter", kept)
    return json.loads((ws / "metrics/train.json").read_text()), kept


@pytest.mark.slow
def test_two_data_parallel_processes_train_like_one(ws, padded, two_processes):
    """train.num_processes: 2 runs two gloo processes on this CPU host; with the per-process
    batch halved the effective batch is unchanged, and so, up to data order, is the loss."""
    one, (two, _) = padded, two_processes
    assert two["steps"] == one["steps"]
    assert two["tokens_seen"] == pytest.approx(one["tokens_seen"], rel=0.25)  # both ranks counted
    assert abs(two["train_loss"] - one["train_loss"]) / one["train_loss"] < DDP_LOSS_RTOL


FSDP_ATOL = 1e-5  # weights, FSDP vs data-parallel on the same 2 processes (reduce-scatter vs all-reduce sums)
UNQUANTIZED = {"quant": {"load_in_4bit": False}, "export": {"merge_into": "original"}}


def saved_files(folder: Path) -> dict[str, object]:
    """What train wrote in `folder`: each safetensors file's tensors, every other file's text
    (JSON parsed)."""
    import json

    from safetensors.torch import load_file

    return {p.name: load_file(p) if p.suffix == ".safetensors" else json.loads(p.read_text())
            if p.suffix == ".json" else p.read_text() for p in sorted(folder.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "none"])
def test_fsdp_trains_like_data_parallel_and_saves_the_same_files(ws, method, tmp_path):
    """train.fsdp on two gloo processes, a LoRA adapter and full fine-tuning: FSDP2 runs on
    this CPU (sharded weights, gradients, optimizer state and checkpoints); killed after a
    checkpoint and rerun, it resumes from that checkpoint's shards, loads the best evaluated
    checkpoint's at the end, and has trained what plain data parallelism on the same two
    processes trains, up to float rounding; the first process writes the gathered result in
    the same files, keys, shapes and dtypes."""
    import json

    batch = yaml.safe_load((ws / "params.yaml").read_text())["train"]["per_device_train_batch_size"]
    saved, metrics = {}, {}
    for fsdp in (False, True):
        params = merge(yaml.safe_load((ws / "params.yaml").read_text()), merge(UNQUANTIZED, {
            "peft": {"method": method},
            "train": {"padding_free": False, "num_processes": 2, "per_device_train_batch_size": batch // 2,
                      "fsdp": fsdp, "eval_steps": 2}}))  # the best checkpoint is loaded at the end
        (ws / "fsdp.yaml").write_text(yaml.safe_dump(params))
        if fsdp:  # killed after a sharded checkpoint: the rerun resumes from it
            checkpoint = killed_after_checkpoint(ws, "--params", "fsdp.yaml")
            assert any(p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir())
        done = train(ws, "--params", "fsdp.yaml")
        assert done.returncode == 0, done.stderr
        assert ("gathering the model from 2 shards (FSDP" in done.stderr) == fsdp, done.stderr
        assert (f"resuming from artifacts/checkpoints/{KILL_AFTER}" in done.stderr) == fsdp, done.stderr
        saved[fsdp] = saved_files(ws / "artifacts/adapter")
        metrics[fsdp] = json.loads((ws / "metrics/train.json").read_text())
    assert metrics[True]["best_step"] == metrics[False]["best_step"] is not None
    assert metrics[True]["eval_loss"] == pytest.approx(metrics[False]["eval_loss"], rel=1e-5)
    assert saved[True].keys() == saved[False].keys()
    for name, sharded in saved[True].items():
        whole = saved[False][name]
        if not name.endswith(".safetensors"):
            assert sharded == whole, name
            continue
        assert {k: (v.shape, v.dtype) for k, v in sharded.items()} == {k: (v.shape, v.dtype) for k, v in whole.items()}
        assert max((sharded[k] - whole[k]).abs().max().item() for k in sharded) < FSDP_ATOL, name


NODE_ATOL = 1e-4  # adapter weights, two nodes of one process vs one node of two (gloo sums)
RDZV_TIMEOUT_S = "3"  # a node waiting for one that never comes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(ws: Path | list[Path], params_file: str, nodes: int, run_id: str,
                **extra_env: str) -> list[subprocess.Popen]:
    """`finetune train` once per node, as each node of a cluster runs it, all on this host
    (127.0.0.1); in one workspace (a shared filesystem), or each node in its own of `ws`."""
    rdzv = {"FINETUNE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "FINETUNE_RDZV_ID": run_id, **extra_env}
    places = ws if isinstance(ws, list) else [ws] * nodes
    return [subprocess.Popen(["finetune", "train", "--params", params_file], cwd=place, env={**env(), **rdzv},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for place in places]


def kill_node(proc: subprocess.Popen) -> None:
    """kill -9 a node: its launcher and the training processes it started (in their own
    sessions, so not its process group)."""
    def tree(pid: int) -> list[int]:
        children = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            children += [int(c) for c in (task / "children").read_text().split()]
        return [pid] + [p for c in children for p in tree(c)]

    for pid in tree(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_nodes_train_like_two_processes_on_one(ws, two_processes):
    """train.num_nodes: 2 with one process each is the same world as one node with two: the
    same ranks, batches and gradient sums, so the same adapter up to float rounding."""
    from safetensors.torch import load_file

    batch = yaml.safe_load((ws / "params.yaml").read_text())["train"]["per_device_train_batch_size"]
    variant(ws, "nodes.yaml", padding_free=False, num_nodes=2, per_device_train_batch_size=batch // 2)
    nodes = start_nodes(ws, "nodes.yaml", 2, "same-world")
    outs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert "one of 2 meeting at 127.0.0.1:" in outs[0][1]
    one_node, two_nodes = (load_file(d / "adapter_model.safetensors")
                           for d in (two_processes[1], ws / "artifacts/adapter"))
    assert one_node.keys() == two_nodes.keys()
    assert max((one_node[k] - two_nodes[k]).abs().max().item() for k in one_node) < NODE_ATOL


def train_in_own_checkouts(ws: Path, tmp_path: Path, params_file: str, run_id: str) -> list[Path]:
    """Two nodes (`finetune train --params params_file`), each in its own copy of `ws` with
    FINETUNE_NODE_STORAGE=local; both must succeed and write the same adapter bytes."""
    places = []
    for name in ("node0", "node1"):
        place = tmp_path / name
        shutil.copytree(ws, place, ignore=shutil.ignore_patterns("artifacts", "metrics"))
        places.append(place)
    nodes = start_nodes(places, params_file, 2, run_id, FINETUNE_NODE_STORAGE="local")
    outs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    files = [(p / "artifacts/adapter/adapter_model.safetensors").read_bytes() for p in places]
    assert files[0] == files[1]
    return places


@pytest.mark.slow
def test_nodes_without_a_shared_filesystem_each_write_the_same_adapter(ws, two_processes, tmp_path):
    """FINETUNE_NODE_STORAGE=local: each node trains in its own checkout (as two Prefect
    workers or two pods with their own disks do) and its first process writes the adapter,
    checkpoints and metrics there: the same bytes on both, the adapter of one node with two
    processes up to float rounding."""
    from safetensors.torch import load_file

    batch = yaml.safe_load((ws / "params.yaml").read_text())["train"]["per_device_train_batch_size"]
    variant(ws, "local.yaml", padding_free=False, num_nodes=2, per_device_train_batch_size=batch // 2)
    places = train_in_own_checkouts(ws, tmp_path, "local.yaml", "local-storage")
    assert (places[0] / "metrics/train.json").read_text() == (places[1] / "metrics/train.json").read_text()
    one_node, two_nodes = (load_file(d / "adapter_model.safetensors")
                           for d in (two_processes[1], places[0] / "artifacts/adapter"))
    assert max((one_node[k] - two_nodes[k]).abs().max().item() for k in one_node) < NODE_ATOL
    bad = start_nodes(ws, "local.yaml", 1, "bad-storage", FINETUNE_NODE_STORAGE="nfs", FINETUNE_RDZV_TIMEOUT="5")[0]
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "FINETUNE_NODE_STORAGE is 'nfs': set it to shared" in err, err


@pytest.mark.slow
def test_fsdp_nodes_without_a_shared_filesystem_each_write_the_whole_adapter(ws, two_processes, tmp_path):
    """train.fsdp on two nodes with FINETUNE_NODE_STORAGE=local (as the Prefect flow's
    multi-node runs train): each node's first process gets the whole gathered adapter, not
    only the first node's, and writes it into its own checkout: the same bytes on both, the
    keys and shapes of an unsharded run's adapter, trained."""
    from safetensors.torch import load_file

    batch = yaml.safe_load((ws / "params.yaml").read_text())["train"]["per_device_train_batch_size"]
    params = merge(yaml.safe_load((ws / "params.yaml").read_text()), merge(UNQUANTIZED, {
        "train": {"padding_free": False, "num_nodes": 2, "per_device_train_batch_size": batch // 2, "fsdp": True}}))
    (ws / "fsdp-nodes.yaml").write_text(yaml.safe_dump(params))
    places = train_in_own_checkouts(ws, tmp_path, "fsdp-nodes.yaml", "fsdp-local")
    sharded, unsharded = (load_file(d / "adapter_model.safetensors")
                          for d in (places[1] / "artifacts/adapter", two_processes[1]))
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in unsharded.items()}
    assert all(v.abs().sum() > 0 for k, v in sharded.items() if "lora_B" in k)  # B starts at zero


NETNS_SUBNET = "10.231.{}.{}"  # the test's bridge (.1) and its namespaces (.11, .12, ...)


@contextlib.contextmanager
def network_namespaces(count: int):
    """A bridge on this host and `count` network namespaces plugged into it, each with its own
    address, as hosts on one network: yields (the bridge's address, [(namespace, address,
    interface)]). Needs root and iproute2."""
    tag = f"ft{os.getpid() % 10000}"
    net = NETNS_SUBNET.format(os.getpid() % 250, "{}")
    bridge = f"{tag}br"
    nodes = [(f"{tag}n{i}", net.format(11 + i), f"{tag}v{i}") for i in range(count)]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{net.format(1)}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, (ns, address, iface) in enumerate(nodes):
            ip("netns", "add", ns)
            ip("link", "add", f"{tag}h{i}", "type", "veth", "peer", "name", iface)
            ip("link", "set", iface, "netns", ns)
            ip("link", "set", f"{tag}h{i}", "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", iface)
            ip("-n", ns, "link", "set", iface, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield net.format(1), nodes
    finally:
        for ns, _, _ in nodes:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@pytest.mark.slow
def test_nodes_in_separate_network_namespaces_train_like_two_processes(ws, two_processes):
    """Two nodes, each in its own network namespace with its own address (two hosts on one
    network), meeting at a c10d store this process hosts on the bridge, as the Prefect flow
    hosts it: FINETUNE_NODE_ADDR is the address each node is reached at, GLOO_SOCKET_IFNAME
    gloo's interface. The adapter is one node with two processes' up to float rounding."""
    from datetime import timedelta

    from safetensors.torch import load_file
    from torch.distributed import TCPStore

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    batch = yaml.safe_load((ws / "params.yaml").read_text())["train"]["per_device_train_batch_size"]
    variant(ws, "netns.yaml", padding_free=False, num_nodes=2, per_device_train_batch_size=batch // 2)
    with network_namespaces(2) as (host, nodes):
        store = TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        rdzv = {"FINETUNE_RDZV_ENDPOINT": f"{host}:{store.port}", "FINETUNE_RDZV_ID": "netns"}
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, "finetune", "train", "--params", "netns.yaml"],
                                  cwd=ws, env={**env(), **rdzv, "FINETUNE_NODE_ADDR": address,
                                               "GLOO_SOCKET_IFNAME": iface},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for ns, address, iface in nodes]
        outs = [proc.communicate(timeout=600) for proc in procs]
        del store
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert f"one of 2 meeting at {host}:" in outs[0][1]
    one_node, two_hosts = (load_file(d / "adapter_model.safetensors")
                           for d in (two_processes[1], ws / "artifacts/adapter"))
    assert max((one_node[k] - two_hosts[k]).abs().max().item() for k in one_node) < NODE_ATOL


def test_a_rendezvous_never_reached_is_told_from_one_lost():
    """A node that never reached the endpoint (wrong address, host down, firewall) is told
    so, not that it lost the rendezvous mid-run."""
    from tasks.nodes import Rendezvous

    meeting = Rendezvous("10.0.0.9:29400", "run", 30.0)
    assert meeting.unreachable() == (
        "could not reach the rendezvous at 10.0.0.9:29400 (FINETUNE_RDZV_ENDPOINT): check that the node "
        "(or flow run) hosting it is up and that this node can reach that address and port")
    meeting.backends.append(object())  # the launcher created the backend: it had connected
    assert meeting.unreachable() is None


@pytest.mark.slow
def test_a_lost_node_fails_the_stage_on_the_others_and_a_rerun_resumes(ws):
    """kill -9 one node mid-run: the other stops at its next gradient sum with one message
    (no traceback), and both nodes started again resume from the last checkpoint."""
    import json

    variant(ws, "lost.yaml", padding_free=False, num_nodes=2, max_steps=40, save_steps=2)
    survivor, lost = start_nodes(ws, "lost.yaml", 2, "lost-node")
    deadline = time.monotonic() + 300
    while not (ws / "artifacts/checkpoints/checkpoint-4").is_dir():
        assert time.monotonic() < deadline and survivor.poll() is None, survivor.communicate()
        time.sleep(0.2)
    kill_node(lost)
    _, err = survivor.communicate(timeout=120)
    lost.wait(timeout=60)
    assert survivor.returncode == 2, err
    # Its training process lost its peer, or its launcher the rendezvous (the lost node hosted it).
    assert re.search(r"finetune train: error: lost (another training process|the rendezvous at \S+) mid-run", err), err
    assert "it resumes from the last checkpoint" in err
    assert "Traceback" not in err
    nodes = start_nodes(ws, "lost.yaml", 2, "lost-node-rerun")
    outs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert "resuming from artifacts/checkpoints/checkpoint-" in outs[0][1]
    assert json.loads((ws / "metrics/train.json").read_text())["steps"] == 40


def test_a_node_that_never_joins_fails_the_stage_naming_the_count(ws):
    variant(ws, "alone.yaml", num_nodes=2)
    alone = start_nodes(ws, "alone.yaml", 1, "alone", FINETUNE_RDZV_TIMEOUT=RDZV_TIMEOUT_S)[0]
    out, err = alone.communicate(timeout=120)
    assert alone.returncode == 2, err
    assert ("train.num_nodes is 2, but 1 of the 2 nodes never joined the rendezvous at 127.0.0.1:"
            in err), err
    assert "Traceback" not in err


def test_several_nodes_need_a_rendezvous_endpoint(monkeypatch):
    from tasks.errors import PipelineError
    from tasks.nodes import RDZV_ENDPOINT_ENV, RDZV_TIMEOUT_ENV, rendezvous

    monkeypatch.delenv(RDZV_ENDPOINT_ENV, raising=False)
    with pytest.raises(PipelineError, match="set FINETUNE_RDZV_ENDPOINT to host:port"):
        rendezvous(2)
    monkeypatch.setenv(RDZV_ENDPOINT_ENV, "10.0.0.1:29400")
    monkeypatch.setenv(RDZV_TIMEOUT_ENV, "soon")
    with pytest.raises(PipelineError, match="FINETUNE_RDZV_TIMEOUT is 'soon'"):
        rendezvous(2)


def test_a_launcher_with_another_process_count_is_refused(ws):
    env_ = {**env(), "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    variant(ws, "two.yaml", num_processes=2)
    out = subprocess.run(["finetune", "train", "--params", "two.yaml"], cwd=ws, env=env_,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert "train.num_processes is 2 but this run has 1 processes" in out.stderr


def test_tf32_and_liger_need_their_hardware(ws):
    from tasks.errors import PipelineError
    from tasks.train import training_arguments

    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for key, needle in (("tf32", "no GPU with TF32"), ("use_liger_kernel", "liger-kernel package")):
        bad = parse_params(merge(raw, {"train": {key: True}}), "p")
        with pytest.raises(PipelineError, match=needle):
            training_arguments(bad, str(ws / "unused"))


def test_torch_compile_turns_compile_back_on(ws, monkeypatch):
    """Stage processes start with torch.compile off (tasks/__init__.py); train.torch_compile
    turns it back on, and is refused when the user's own environment turned it off."""
    import tasks
    from tasks.errors import PipelineError
    from tasks.train import training_arguments

    on = parse_params(merge(yaml.safe_load((ws / "params.yaml").read_text()),
                            {"train": {"torch_compile": True}}), "p")
    monkeypatch.setattr(tasks, "_COMPILE_OFF_HERE", True)
    monkeypatch.setenv(tasks.COMPILE_SWITCH, "1")
    assert training_arguments(on, str(ws / "unused")).torch_compile
    assert tasks.COMPILE_SWITCH not in os.environ
    monkeypatch.setattr(tasks, "_COMPILE_OFF_HERE", False)
    monkeypatch.setenv(tasks.COMPILE_SWITCH, "1")
    with pytest.raises(PipelineError, match="train.torch_compile is true but TORCHDYNAMO_DISABLE=1"):
        training_arguments(on, str(ws / "unused"))


@pytest.mark.parametrize("resumed_at, this_call_loss, expected", [
    # logs every 2 steps, 7 steps, the last one unlogged (loss 4): the whole run's mean per step
    (0, 16 / 7, 16 / 7),
    # resumed from step 4: the Trainer's training_loss covers steps 5-7 only ((3 + 3 + 4) / 3)
    (4, 10 / 3, 16 / 7),
    # resumed from step 5, a checkpoint between two logs: step 5 was never logged; its window
    # after the resume is step 6 alone, and the mean is over the six steps it knows
    (5, (3 + 4) / 2, (2 * 1 + 2 * 2 + 1 * 3 + 4) / 6),
])
def test_train_loss_counts_every_logged_step_across_a_resume(resumed_at, this_call_loss, expected):
    from transformers.trainer_utils import TrainOutput

    from tasks.train import _train_loss

    history = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 2.0}, {"step": 6, "loss": 3.0}]
    result = TrainOutput(global_step=7, training_loss=this_call_loss, metrics={})
    assert _train_loss(history, result, resumed_at) == pytest.approx(expected)
