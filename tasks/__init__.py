"""The pipeline's stages, one module each (tasks/<stage>.py, `finetune <stage>`)."""

import os

# Same inputs, same bytes: pin the CPU math libraries' run-time choices before torch loads
# them. MKL otherwise picks its thread count per call (MKL_DYNAMIC) and may take code paths
# that depend on memory alignment (CNR off), and OpenMP may shrink thread teams under load;
# each can reorder a floating-point sum. AUTO,STRICT keeps the fastest instruction set this
# CPU has. A user's own setting wins.
for _name, _value in (("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE"), ("MKL_CBWR", "AUTO,STRICT")):
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
