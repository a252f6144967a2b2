"""`facepipe decode`: InsightFace `.rec`/`.bin` sets into Parquet shards + pair tables.

`job` is the entry (`decode_dataset`); `plan` splits the sources into tasks, `worker` converts one
range, `runner` runs tasks locally or on Ray, `resume`/`hashing` make a killed run resumable, and
`manifest`/`pairs`/`sidecars`/`coverage` write what the shards are and that no record was lost.
"""
