"""Manifest-driven data layer: manifests, builders, splits, validation, image IO, transforms, datasets.

Import submodules directly (``medgcsam.data.transforms``, ``medgcsam.data.datasets``); this package
only re-exports the light, dependency-free parts so ``import medgcsam.data`` never pulls in MONAI.
"""

from medgcsam.data.io import IMAGE_SUFFIXES, ImageReadError, read_image
from medgcsam.data.manifest import MANIFEST_COLUMNS, ManifestError, manifest_sha256, read_manifest, write_manifest
from medgcsam.data.tasks import Task, get_task, list_tasks

__all__ = ["IMAGE_SUFFIXES", "MANIFEST_COLUMNS", "ImageReadError", "ManifestError", "Task", "get_task",
           "list_tasks", "manifest_sha256", "read_image", "read_manifest", "write_manifest"]
