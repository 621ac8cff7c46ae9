"""``spft-bench`` and its parts: the layer and op benchmarks, the end-to-end training bench, reports
and plots, peak-memory tracking. May import any other folder; nothing imports it."""
