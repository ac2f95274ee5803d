"""Tools that read checkpoints and runs: evaluation (nll, ShapesEval), generation, samples during training,
scaling-law sweeps and fits, and the memory/throughput plan of a cluster run."""
