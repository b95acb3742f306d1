"""The pipeline's stages, one module each (tasks/<stage>.py, `finetune <stage>`)."""

import os

# Same inputs, same bytes, on any x86-64 machine: pin the CPU math libraries' run-time choices
# before torch loads them. MKL otherwise picks its thread count per call (MKL_DYNAMIC) and may
# take code paths that depend on memory alignment (CNR off), and OpenMP may shrink thread teams
# under load; each can reorder a floating-point sum. MKL, oneDNN and ATen's own vectorised
# kernels would also each pick their code path by CPU (AVX2, AVX-512, AVX-512-BF16, vendor),
# and different paths round differently: all three are held to AVX2, which every current
# x86-64 server has, so the committed dvc.lock is what an Intel and an AMD machine compute
# (its cost: BENCHMARKS.md). CUDA kernels make no such promise; on a GPU this only touches the
# little math done on the CPU. A user's own setting wins (e.g. MKL_CBWR=AUTO,STRICT
# ATEN_CPU_CAPABILITY=avx512 for the fastest path of one machine).
CPU_DETERMINISM = (("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE"), ("MKL_CBWR", "AVX2,STRICT"),
                   ("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"))
for _name, _value in CPU_DETERMINISM:
    os.environ.setdefault(_name, _value)

# torch.compile stays off unless train.torch_compile asks for it (allow_compile). bitsandbytes
# wraps its CPU kernels in torch.compile when it is imported, and that loads TorchInductor:
# 2-3 s in every stage process that loads a model, for kernels a CPU run never calls (the
# adapter's bytes are the same either way; BENCHMARKS.md). A user's own setting wins.
COMPILE_SWITCH = "TORCHDYNAMO_DISABLE"
_COMPILE_OFF_HERE = COMPILE_SWITCH not in os.environ
os.environ.setdefault(COMPILE_SWITCH, "1")


def allow_compile() -> bool:
    """Turns torch.compile back on for this process (train.torch_compile: true), unless the
    user turned it off; False then. torch reads the switch at each torch.compile call, so this
    holds for what is compiled from here on."""
    if _COMPILE_OFF_HERE:
        os.environ.pop(COMPILE_SWITCH, None)
    return os.environ.get(COMPILE_SWITCH) != "1"
