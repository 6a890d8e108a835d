"""The engine: from a batch to per-chunk sums of per-sample squared gradients.

``batches`` (what a batch is) → ``numerics`` (compute dtype and scope) → ``probes`` (the one probe
mechanism: layer inputs and output gradients without hooks) → ``vectorise`` (``vmap(grad)`` of the
per-sample loss) → ``group_sums`` (direct and factorised group Fisher) → ``loop`` (the one chunk
loop); ``kinds`` (which targets) and ``nonfinite`` (NaN/Inf policy) alongside.
"""
