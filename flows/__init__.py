"""Prefect flows that drive facepipe: wiring only — each task runs a `facepipe` command or reads the registry.

Flows: `ingest`, `train-backbone`, `train-pfe`, `train-probface`, `train-scf`, `benchmark` and `pipeline`;
their deployments are declared in prefect.yaml.
"""
