"""The reference's formats: a workdir's parameters exported as a torch ``.pth`` state dict
or safetensors with the configuration as metadata (and the reference YAML beside it), and a
reference state dict imported into a workdir (written by ``workdir.params``)."""

from __future__ import annotations

import json
import os
import pathlib
import uuid

import ml_collections
import numpy as np
from flax import nnx

from starflow_jax.config import model_config
from starflow_jax.config.model_config import ModelConfig
from starflow_jax.config.reference_args import to_model_kwargs, to_yaml_arguments
from starflow_jax.interop.named_tensors import load_torch_file
from starflow_jax.interop.state_dict import from_reference, reference_buffers, to_reference
from starflow_jax.model import StarFlow
from starflow_jax.workdir.layout import CheckpointError
from starflow_jax.workdir.params import check_import_target, write_imported

EXPORT_DTYPES = ("float32", "bfloat16")


def export_arrays(cfg: ModelConfig, params, dtype: str = "float32", release: bool = False) -> dict[str, np.ndarray]:
    """Reference names to arrays (float32), deprecated buffers included; leaf by leaf
    (``release``: the parameters' device arrays are freed as they are converted)."""
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    out = to_reference(params, release=release)
    bad = sorted(k for k, v in out.items() if not np.all(np.isfinite(v)))
    if bad:
        raise CheckpointError(f"parameters hold NaN or Inf: {bad}")
    out.update(reference_buffers(cfg))
    for k in out:
        if out[k].dtype != np.float32:
            out[k] = np.ascontiguousarray(out[k], np.float32)
    return out


def _check_out(*paths: pathlib.Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite``, naming it."""
    for path in paths:
        if path.exists() and not overwrite:
            raise CheckpointError(f"{path} exists; pass --overwrite to replace it")


def export_outputs(path, fmt: str) -> list[pathlib.Path]:
    """The files an export to ``path`` writes: the checkpoint and, for safetensors, the
    reference YAML beside it (``<stem>.yaml``)."""
    path = pathlib.Path(path)
    if fmt != "safetensors":
        return [path]
    yaml_path = path.with_suffix(".yaml")
    if yaml_path == path:
        raise CheckpointError(
            f"{path}: a safetensors output cannot end in .yaml (its reference YAML is written beside it as <stem>.yaml)"
        )
    return [path, yaml_path]


def _write_atomically(writes: dict) -> None:
    """``{path: write}``: each ``write(tmp)`` fills a temporary file beside its ``path``; only
    when all have succeeded are they renamed into place, so that a failure never leaves a
    half-written output (nor one output new and the other old)."""
    tmps = {path: path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp") for path in writes}
    try:
        for path, write in writes.items():
            write(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def write_torch(path, arrays: dict, dtype: str, overwrite: bool = False) -> None:
    path = pathlib.Path(path)
    _check_out(path, overwrite=overwrite)
    try:
        import torch
    except ImportError as e:
        raise CheckpointError("--format torch needs torch (pip install -e '.[torch]')") from e
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    # consumes ``arrays`` key by key: float32 tensors share the NumPy memory, bfloat16 ones
    # replace it, so at most one extra leaf is held at a time
    tensors = {}
    for k in list(arrays):
        t = torch.from_numpy(arrays.pop(k))
        tensors[k] = t.to(tdtype) if tdtype != torch.float32 else t
    _write_atomically({path: lambda tmp: torch.save(tensors, str(tmp))})


def write_safetensors(path, arrays: dict, cfg: ModelConfig, dtype: str, overwrite: bool = False) -> None:
    path = pathlib.Path(path)
    yaml_path = export_outputs(path, "safetensors")[1]
    _check_out(path, yaml_path, overwrite=overwrite)
    metadata = {
        "format": "starflow-jax",
        "model_kwargs": json.dumps(to_model_kwargs(cfg)),
        "reference_yaml": to_yaml_arguments(cfg),
        "txt_dim": str(cfg.txt_dim),
    }
    if dtype == "bfloat16":
        try:
            import torch
            from safetensors.torch import save_file
        except ImportError as e:
            raise CheckpointError("bfloat16 safetensors need torch (pip install -e '.[torch]')") from e
        tensors = {}
        for k in list(arrays):  # key by key, as in write_torch
            tensors[k] = torch.from_numpy(arrays.pop(k)).to(torch.bfloat16)
    else:
        from safetensors.numpy import save_file

        tensors = arrays
    _write_atomically(
        {
            path: lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
            yaml_path: lambda tmp: tmp.write_text(to_yaml_arguments(cfg)),
        }
    )


def import_reference(
    source: str | pathlib.Path, config: ml_collections.ConfigDict, out: str | pathlib.Path, overwrite: bool = False
) -> list[str]:
    """A reference state dict into a workdir (``config.json`` + ``params/``); returns the
    deprecated buffers that were ignored.

    The state dict is read and checked first; the workdir is then written to a staging
    directory beside ``out`` and moved in at the very end, so that a failure leaves ``out``
    as it was. A non-empty ``out`` needs ``overwrite``, which replaces what a workdir holds
    (``WORKDIR_ENTRIES``) and keeps any other file there."""
    out = check_import_target(out, overwrite)
    cfg = model_config(config)
    sd = load_torch_file(source)
    abstract = nnx.state(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    ignored: list[str] = []
    params = from_reference(abstract, sd, report=ignored)
    write_imported(out, config, params)
    return ignored
