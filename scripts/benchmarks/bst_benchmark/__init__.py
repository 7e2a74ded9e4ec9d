"""The code behind scripts/benchmarks/benchmark.py, one module per part: `settings` (flags), `baselines` (the layers and models
compared), `measurement` (the timing protocol), `sections`, `profiling`, `report` (ratios, targets), `plots`."""
