"""forensic-gender: forensic image triage (faces, gender, age) for evidence folders."""

__version__ = "0.1.0"
