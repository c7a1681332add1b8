"""The artifact store and its records (docs/design.md §3); see `tasks.store.store` for the layout and guarantees."""

from tasks.store.errors import BadName, BadStoreURL, CorruptArtifact, StoreError, StoreNotFound, StoreUnreachable
from tasks.store.records import BlobRef, DirListing, GcReport, LsRow, Manifest, canonical_json, validate_name
from tasks.store.store import Store, hash_file

__all__ = [
    "BadName",
    "BadStoreURL",
    "BlobRef",
    "CorruptArtifact",
    "DirListing",
    "GcReport",
    "LsRow",
    "Manifest",
    "Store",
    "StoreError",
    "StoreNotFound",
    "StoreUnreachable",
    "canonical_json",
    "hash_file",
    "validate_name",
]
