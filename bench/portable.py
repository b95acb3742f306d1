"""Do other x86-64 CPUs compute this one's bytes (model.cpu_math: portable, issue 28)?

`finetune train` runs a few steps on this CPU and then under QEMU's user-mode emulation of
other CPU models, Intel and AMD, in a prepared copy of the repository (the quickstart's
params), and the adapter's md5 of each run is compared with this CPU's. QEMU 7.2 (Debian 12)
emulates AVX2 but no AVX-512, and reports the emulated model's vendor, so MKL, oneDNN, ATen
and bitsandbytes pick their code paths as they would on such a machine; its arithmetic is
IEEE's, while a real CPU's approximate instructions (rcpps, rsqrtps) are its own, so an
agreement here is strong evidence, not proof. `--probe` also hashes single torch operations
(a matmul, SDPA, AdamW, sqrt, ...) on each CPU and lists those that differ, which is how a
CPU-dependent kernel is found.

    apt-get install qemu-user        # Debian's package: qemu-x86_64
    python bench/portable.py [--steps 3] [--cpus Haswell-v4 EPYC-Rome-v2] [--probe]

One JSON line per CPU. Emulation is slow: about 35 s per training step of the smoke model,
plus 90 s to start, per CPU model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run import env, workspace  # noqa: E402

QEMU = "qemu-x86_64"
CPUS = ("Haswell-v4", "EPYC-Rome-v2")  # an Intel and an AMD model, both AVX2 without AVX-512
STEPS = 3  # the first step trains at learning rate 0 (warmup): 3 steps apply two updates
ADAPTER = "artifacts/adapter/adapter_model.safetensors"


def probe() -> dict[str, str]:
    """md5 (10 hex digits) of what each operation a training step uses computes here, on
    seeded inputs."""
    import tasks  # noqa: F401  (model.cpu_math's pins, before torch loads)
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    out: dict[str, str] = {}

    def keep(name: str, t: torch.Tensor) -> None:
        out[name] = hashlib.md5(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:10]

    a, b, c = torch.randn(64, 128), torch.randn(128, 256), torch.randn(64, 256)
    keep("matmul", a @ b)
    keep("matmul_grad_a", c @ b.t())
    keep("matmul_grad_b", a.t() @ c)
    x = torch.rand(5000) * 4 - 2
    for name in ("exp", "tanh", "sigmoid", "erf", "sin", "cos", "atan"):
        keep(name, getattr(torch, name)(x))
    for name in ("sqrt", "rsqrt", "log"):
        keep(name, getattr(torch, name)(x.abs() + 0.01))
    keep("silu", F.silu(x))
    keep("softmax", F.softmax(x.reshape(50, 100), -1))
    logits = torch.randn(64, 333, requires_grad=True)
    F.cross_entropy(logits, torch.randint(0, 333, (64,))).backward()
    keep("cross_entropy_grad", logits.grad)
    q, k, v = (torch.randn(2, 4, 40, 16, requires_grad=True) for _ in range(3))
    attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    attended.sum().backward()
    keep("sdpa", attended)
    keep("sdpa_grad", q.grad)
    for fused in (False, True):
        torch.manual_seed(1)
        p, g = torch.nn.Parameter(torch.randn(1000)), torch.randn(1000)
        opt = torch.optim.AdamW([p], lr=3e-3, fused=fused)
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        keep(f"adamw_{'fused' if fused else 'unfused'}", p)
    grads = [torch.randn(300) * 3 for _ in range(3)]
    keep("grad_norm", torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).reshape(1))
    return out


def run(cpu: str | None, ws: Path, params_file: str, with_probe: bool) -> dict:
    """The adapter's md5 (and the probe's hashes) of one training run on `cpu` (None: this one)."""
    qemu = [QEMU, "-cpu", cpu] if cpu else []
    shutil.rmtree(ws / "artifacts", ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([*qemu, sys.executable, shutil.which("finetune", path=env()["PATH"]), "train",
                           "--params", params_file], cwd=ws, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"finetune train on {cpu or 'this CPU'} failed:\n{proc.stderr[-3000:]}")
    result = {"cpu": cpu or "this", "seconds": round(time.perf_counter() - start, 1),
              "adapter_md5": hashlib.md5((ws / ADAPTER).read_bytes()).hexdigest()}
    if with_probe:
        code = "import json, sys; sys.path.insert(0, '.'); from bench.portable import probe; print(json.dumps(probe()))"
        found = subprocess.run([*qemu, sys.executable, "-c", code], cwd=ws, env=env(), capture_output=True,
                               text=True, check=True)
        result["probe"] = json.loads(found.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cpus", nargs="+", default=list(CPUS), help="QEMU CPU models (qemu-x86_64 -cpu help)")
    parser.add_argument("--probe", action="store_true", help="also hash single torch operations on each CPU")
    args = parser.parse_args(argv)
    if shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: apt-get install qemu-user")
    ws = workspace()
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"].update(max_steps=args.steps, save_steps=args.steps + 1)  # no checkpoint: no resume
    (ws / "short.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    here = run(None, ws, "short.yaml", args.probe)
    print(json.dumps(here), flush=True)
    for cpu in args.cpus:
        there = run(cpu, ws, "short.yaml", args.probe)
        there["same_adapter"] = there["adapter_md5"] == here["adapter_md5"]
        if args.probe:
            there["ops_that_differ"] = sorted(k for k in here["probe"] if here["probe"][k] != there["probe"][k])
            del there["probe"]
        print(json.dumps(there), flush=True)
    shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
