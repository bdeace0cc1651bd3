"""Plain-library baselines: what a user writes by hand without ftctl, measured in the same benchmark run."""
