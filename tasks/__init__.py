"""The pipeline's stages, one module each (tasks/<stage>.py, `finetune <stage>`)."""

import os
import sys

# Same inputs, same bytes: pin the CPU math libraries' run-time choices before torch loads
# them. MKL otherwise picks its thread count per call (MKL_DYNAMIC) and may take code paths that
# depend on memory alignment (CNR off), and OpenMP may shrink thread teams under load; each can
# reorder a floating-point sum.
CPU_DETERMINISM = (("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE"))
# model.cpu_math. MKL, oneDNN and ATen's vectorised kernels each pick a code path by CPU (AVX2,
# AVX-512, AVX-512-BF16, vendor), and different paths round differently. portable holds ATen
# and oneDNN to AVX2, which every current x86-64 server has, and MKL to its COMPATIBLE branch
# (SSE2 without approximate reciprocals): the only fixed branch MKL honours on AMD as well as
# Intel CPUs (on AMD, MKL_CBWR=AVX2 silently means AUTO: a lock written that way on an AMD
# EPYC differed on a Xeon). COMPATIBLE has no strict mode, so its sums depend on MKL's thread
# count: one thread makes a 2-core and a 64-core machine agree. native lets each library take
# this CPU's fastest path (AUTO,STRICT keeps reruns on one machine identical). Costs:
# BENCHMARKS.md. CUDA kernels make no such promise; on a GPU this only touches the little math
# done on the CPU. A variable the user set wins over both.
CPU_MATH = {
    "portable": (("MKL_CBWR", "COMPATIBLE"), ("MKL_NUM_THREADS", "1"),
                 ("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")),
    "native": (("MKL_CBWR", "AUTO,STRICT"),),
}
DEFAULT_CPU_MATH = "portable"
for _name, _value in CPU_DETERMINISM:
    os.environ.setdefault(_name, _value)
# The variables use_cpu_math set, for the processes this one starts: a stage process started
# by the flow or by another stage must not take its parent's pins for the user's own.
CPU_MATH_SET_HERE = "FINETUNE_CPU_MATH_PINS"
_CPU_MATH_VARS = {name for pins in CPU_MATH.values() for name, _ in pins}
_inherited = set(os.environ.get(CPU_MATH_SET_HERE, "").split(","))
_USER_SET = {name for name in _CPU_MATH_VARS if name in os.environ and name not in _inherited}
_cpu_math = ""


def use_cpu_math(mode: str) -> None:
    """Sets model.cpu_math's variables for this process and the processes it starts. They are
    read when torch loads, so a change after that is refused: a stage runs in the mode its
    params say, or not at all."""
    global _cpu_math
    if mode == _cpu_math:
        return
    if _cpu_math and "torch" in sys.modules:
        from tasks.errors import PipelineError

        raise PipelineError(f"model.cpu_math is {mode!r}, but torch was already loaded in this "
                            f"process with {_cpu_math!r} CPU math: run the stage in its own "
                            "process (finetune <stage>, dvc repro or the flow)")
    for name in _CPU_MATH_VARS - _USER_SET:
        os.environ.pop(name, None)
    pins = {name: value for name, value in CPU_MATH[mode] if name not in _USER_SET}
    os.environ.update(pins)
    os.environ[CPU_MATH_SET_HERE] = ",".join(pins)
    _cpu_math = mode


use_cpu_math(DEFAULT_CPU_MATH)

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
