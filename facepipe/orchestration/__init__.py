"""What the Prefect flows (`flows/`) run, without Prefect: the flows only wire these into tasks.

- `stage_cache`: fingerprints of a stage's command, parameters and inputs, and the markers that let a
  rerun skip a stage whose outputs are still there.
- `stage_process`: a stage as the `facepipe` CLI in a subprocess, its full output in a log file and
  only facepipe's own lines on the console.
- `settings`: a flow's workdir, parameter file and overrides, and the typed config they give.
- `registry`: the MLflow runs a stage logged, registered versions, moving `champion`.
- `dvc`: versioning a dataset folder with DVC.
"""
