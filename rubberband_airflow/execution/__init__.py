"""Running trials for real: run storage, the instance agent, trial workers and compute backends."""
