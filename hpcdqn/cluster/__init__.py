"""Scaling studies on a workstation or a cluster (``scale``: ``hpcdqn scale``), launchers and
allocations, and the allreduce cost model fitted from measurements (``costmodel``)."""
