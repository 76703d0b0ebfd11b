"""forensic-gender: forensic image triage (faces, gender, age) for evidence folders."""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it (dynamic)
