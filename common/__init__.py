"""Plumbing shared by every package: typed configs, atomic writes, artifacts, CLI helpers."""
