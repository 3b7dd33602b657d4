"""Kernel generators, one module per family.

`KERNEL_MODULES` lists the modules that register a lowering for an op of lowering class
"kernel" (`lower.register_kernel_lowering`); they are imported when such an op is lowered.
"""

KERNEL_MODULES: tuple[str, ...] = ()
