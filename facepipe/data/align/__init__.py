"""`facepipe align`: detect (YuNet) or read five landmarks, warp to the template, write shards.

`job` is the entry; `plan` lists the images, `worker` aligns one chunk, `run` runs the chunks,
`merge` publishes them, `geometry`/`codec`/`detect` do the per-image work, `contact_sheet` the PNG check.
"""
