"""Parity with the PyTorch reference on every case in $STARFLOW_REFERENCE_CASES
(default ../shared/reference beside the checkout): one test per (case, op)."""

import pytest

from starflow_jax.interop import reference_cases as rc

CASE_FILES = rc.discover()


def _params():
    out = []
    for path in CASE_FILES:
        case = rc.load_case(path)
        for op in case.ops:
            out.append(pytest.param(path, op["name"], id=f"{case.name}-{op['name']}"))
    return out


def test_cases_directory_has_cases():
    assert CASE_FILES, (
        f"no parity cases (*.npz) found in {rc.cases_dir()}; set ${rc.ENV_VAR} to a directory of reference cases"
    )


_MODELS = {}


def _model(path):
    if path not in _MODELS:
        _MODELS.clear()
        _MODELS[path] = rc.build_model(rc.load_case(path))[0]
    return _MODELS[path]


@pytest.mark.parametrize("path,op_name", _params())
def test_reference_op(path, op_name):
    case = rc.load_case(path)
    op = case.op(op_name)
    results = rc.evaluate_op(case, op, _model(path))
    assert results, f"op {op_name} of case {case.name} lists no outputs"
    worst = max(results, key=lambda r: r.err / r.tol)
    print(
        f"\n[{case.name}-{op_name}] {len(results)} outputs, worst {worst.key}: err {worst.err:.3e} "
        f"(tolerance {worst.tol:.1e})"
    )
    failed = [r for r in results if not r.ok]
    assert not failed, "outputs over tolerance: " + ", ".join(f"{r.key}: {r.err:.3e} > {r.tol:.1e}" for r in failed)
