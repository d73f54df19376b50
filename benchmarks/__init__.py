"""Benchmarks of gradnorm-lightning (not part of the installed package).

* :mod:`benchmarks.workloads`: the models, data and per-task losses benchmarked;
* :mod:`benchmarks.methods`: the rows of the table (plain sum, textbook GradNorm,
  gradnorm-pytorch, LibMTL-style, this project's routes);
* :mod:`benchmarks.measure`: the float64 trajectory check, interleaved timing, peak memory;
* :mod:`benchmarks.lightning_timing`: the same model trained by a Lightning ``Trainer``;
* :mod:`benchmarks.bench_step`: the command line that writes the Markdown report;
* :mod:`benchmarks.weight_stability`: whether the task weights flip-flop, per configuration.
"""
