"""Face alignment: the public API of the align stage, gathered from its modules.

- `align_geometry`: templates (arcface 112x112, sphereface 112x96, probface 96x96), the closed-form
  least-squares similarity transform, the warp, the landmark error;
- `align_codec`: decoding (huge JPEGs shrunk while decoding) and encoding of images;
- `align_plan`: the job's settings, listing the input and cutting it into chunk tasks;
- `align_worker`: `align_chunk`, the per-chunk worker (a picklable top-level function, usable as a Ray
  task), its chunk files and done markers, the reject reasons;
- `align_merge`: merging the chunk files into training shards, rejects, labels and the manifest;
- `align_pairs`: verification pair lists into pair tables of aligned crops;
- `contact_sheet`: a PNG grid of aligned crops to check the alignment by eye;
- `align_run`: `run_align`, the resumable job (`facepipe align`), and `run_tasks`.
Face detection is in `facepipe.data.detect`, landmark files in `facepipe.data.landmarks`.
"""

from __future__ import annotations

from facepipe.data.align_codec import decode_for_alignment, decode_image, encode_image, jpeg_size
from facepipe.data.align_geometry import (
    TEMPLATES,
    Template,
    align_face,
    apply_transform,
    get_template,
    landmark_error,
    similarity_transform,
)
from facepipe.data.align_merge import merge_chunks
from facepipe.data.align_pairs import read_pairs_file, write_pairs
from facepipe.data.align_plan import (
    PLAN_VERSION,
    AlignSettings,
    ChunkTask,
    find_input_shards,
    list_identity_files,
    make_tasks,
    plan_job,
)
from facepipe.data.align_run import run_align, run_tasks
from facepipe.data.align_worker import REJECT_REASONS, align_chunk, chunk_paths, rejects_schema
from facepipe.data.contact_sheet import write_contact_sheet

__all__ = [
    "TEMPLATES",
    "Template",
    "get_template",
    "similarity_transform",
    "apply_transform",
    "align_face",
    "landmark_error",
    "decode_image",
    "jpeg_size",
    "decode_for_alignment",
    "encode_image",
    "PLAN_VERSION",
    "AlignSettings",
    "ChunkTask",
    "list_identity_files",
    "find_input_shards",
    "plan_job",
    "make_tasks",
    "REJECT_REASONS",
    "rejects_schema",
    "chunk_paths",
    "align_chunk",
    "merge_chunks",
    "read_pairs_file",
    "write_pairs",
    "write_contact_sheet",
    "run_align",
    "run_tasks",
]
