"""The cluster templates under deploy/: the SLURM batch script and the Kubernetes PyTorchJob
start `finetune train` once per node with the rendezvous variables the train stage reads.
Neither has run on a cluster here; these checks are what can be checked without one: shell
syntax, and that the names and the command are the ones the code uses."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tasks.nodes import RDZV_ENDPOINT_ENV, RDZV_ID_ENV, RDZV_TIMEOUT_ENV

from .conftest import REPO

SBATCH = REPO / "deploy/slurm/train.sbatch"
PYTORCHJOB = REPO / "deploy/kubernetes/pytorchjob.yaml"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_slurm_script_parses_and_sets_the_rendezvous():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True).returncode == 0
    text = SBATCH.read_text()
    for name in (RDZV_ENDPOINT_ENV, RDZV_ID_ENV, RDZV_TIMEOUT_ENV):
        assert f"export {name}=" in text
    assert "srun " in text and text.rstrip().endswith(".venv/bin/finetune train")


def test_the_pytorchjob_runs_finetune_train_on_every_replica():
    job = yaml.safe_load(PYTORCHJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["spec"]["runPolicy"]["backoffLimit"] == 0  # a lost node fails the job
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for spec in replicas.values():
        assert spec["restartPolicy"] == "Never"
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the container the operator sets MASTER_ADDR in
        script = container["args"][0]
        assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
        assert f'{RDZV_ENDPOINT_ENV}="$MASTER_ADDR:$MASTER_PORT"' in script and f"{RDZV_ID_ENV}=" in script
        assert script.endswith("exec .venv/bin/finetune train")
        assert {e["name"] for e in container["env"]} == {RDZV_TIMEOUT_ENV}
        mounts = {m["name"] for m in container["volumeMounts"]}
        assert mounts <= {v["name"] for v in spec["template"]["spec"]["volumes"]}
