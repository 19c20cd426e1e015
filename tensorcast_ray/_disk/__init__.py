"""The shared-disk tier: safetensors shards + a manifest per artifact version.  [SDK, daemon]

The daemon's persistence tasks export artifacts here and import them back on a cold
start; the SDK uses the same functions for explicit export / import and to load Hugging
Face style checkpoints.  No torch: tensors travel as canonical dtype strings and bytes.
Layout, manifest fields, key → path mapping, commit protocol, shard planning, per-shard
retries and integrity checks: docs/disk-format.md.
"""

from __future__ import annotations

from tensorcast_ray._disk._checkpoint import (
    Checkpoint,
    CheckpointTensor,
    read_checkpoint_into,
    scan_checkpoint,
)
from tensorcast_ray._disk._manifest import Manifest, ManifestShard, ManifestTensor
from tensorcast_ray._disk._paths import artifact_path
from tensorcast_ray._disk._reader import (
    list_artifacts,
    read_into,
    read_manifest,
    read_tensor_range,
)
from tensorcast_ray._disk._writer import (
    SHARD_STATES,
    ShardEvent,
    TensorSource,
    delete_artifact,
    write_artifact,
)

__all__ = [
    "SHARD_STATES",
    "Checkpoint",
    "CheckpointTensor",
    "Manifest",
    "ManifestShard",
    "ManifestTensor",
    "ShardEvent",
    "TensorSource",
    "artifact_path",
    "delete_artifact",
    "list_artifacts",
    "read_checkpoint_into",
    "read_into",
    "read_manifest",
    "read_tensor_range",
    "scan_checkpoint",
    "write_artifact",
]
