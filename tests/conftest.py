"""Shared test helpers."""
import json


def write_case_config(tmp_path, case):
    """A config file (JSON of reference Model kwargs) for a reference case's model."""
    path = tmp_path / f"{case.name}_model_kwargs.json"
    path.write_text(json.dumps(case.meta["model_kwargs"]))
    return path
