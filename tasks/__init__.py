"""The pipeline's stages, one module each (tasks/<stage>.py, `finetune <stage>`)."""

import os

# Same inputs, same bytes: pin the CPU math libraries' run-time choices before torch loads
# them. MKL otherwise picks its thread count per call (MKL_DYNAMIC) and may take code paths
# that depend on memory alignment (CNR off), and OpenMP may shrink thread teams under load;
# each can reorder a floating-point sum. AUTO,STRICT keeps the fastest instruction set this
# CPU has. A user's own setting wins.
for _name, _value in (("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE"), ("MKL_CBWR", "AUTO,STRICT")):
    os.environ.setdefault(_name, _value)
