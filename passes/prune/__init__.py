"""Structured channel pruning on the IR: channel rules, dependency groups, importance, and the `prune` pass."""
