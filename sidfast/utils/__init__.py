"""Plumbing below every layer: devices, processes, seeds, autocast, signals and the console."""
