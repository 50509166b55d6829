"""The base class of errors a command reports to its user as one line (exit code 2), not a traceback.

`common.cli.run_main` catches `UserInputError`; each layer subclasses it for the input it checks
(`common.config.ConfigError`, `common.artifact.ArtifactError`, `brats.layout.DataError`), so this
lowest layer names nothing above it.
"""
from __future__ import annotations


class UserInputError(Exception):
    """Something the user supplied (config, artifact, data, command line) that cannot be used; the
    message says which and why."""
