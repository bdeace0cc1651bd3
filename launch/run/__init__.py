"""The run layer's internals: configuration, one run-loading path, the engine (the transformers Trainer configured
from the run), the planner, run records and the model card, reliability and progress. The front doors above it
(`launch.train`, `launch.evaluate`, `launch.predict`, `launch.merge`, `launch.plan`) tell one run's story with
these pieces; the studies (`launch.studies`) and the CLI (`launch.cli`) sit above those."""
