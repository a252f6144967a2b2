"""Face alignment: the public API of the align stage, gathered from its modules.

- `geometry`: templates (arcface 112x112, sphereface 112x96, probface 96x96), the closed-form
  least-squares similarity transform, the warp, the landmark error;
- `codec`: decoding (huge JPEGs shrunk while decoding) and encoding of images;
- `plan`: the job's settings, listing the input and cutting it into chunk tasks;
- `worker`: `align_chunk`, the per-chunk worker (a picklable top-level function, usable as a Ray
  task), its chunk files and done markers, the reject reasons;
- `merge`: merging the chunk files into training shards, rejects, labels and the manifest;
- `pairs`: verification pair lists into pair tables of aligned crops;
- `contact_sheet`: a PNG grid of aligned crops to check the alignment by eye;
- `run`: `run_align`, the resumable job (`facepipe align`), and `run_tasks`.
Face detection is in `facepipe.data.align.detect`, landmark files in `facepipe.data.formats.landmarks`.
"""

from __future__ import annotations

from facepipe.data.align.codec import decode_for_alignment, decode_image, encode_image, jpeg_size
from facepipe.data.align.contact_sheet import write_contact_sheet
from facepipe.data.align.geometry import (
    TEMPLATES,
    Template,
    align_face,
    apply_transform,
    get_template,
    landmark_error,
    similarity_transform,
)
from facepipe.data.align.merge import merge_chunks
from facepipe.data.align.pairs import read_pairs_file, write_pairs
from facepipe.data.align.plan import (
    PLAN_VERSION,
    AlignSettings,
    ChunkTask,
    find_input_shards,
    list_identity_files,
    make_tasks,
    plan_job,
)
from facepipe.data.align.run import run_align, run_tasks
from facepipe.data.align.worker import REJECT_REASONS, align_chunk, chunk_paths, rejects_schema

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
