"""Compute backends: where instances come from (local processes, or EC2)."""
