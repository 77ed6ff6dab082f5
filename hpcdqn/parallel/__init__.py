"""How ranks cooperate: the rank grid (``grid``), flat parameter and gradient buffers (``flat``),
the gradient allreduce (``allreduce``), stage partitioning (``partition``), the pipeline's
point-to-point layer (``pipeline``), and the job's lifecycle: abort, signals (``lifecycle``) and
the allocator setting (``memory``)."""
