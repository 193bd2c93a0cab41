"""Parity with the PyTorch reference: one test per (case, op) on every case in the cases
directory (the repository's tests/reference_cases, or $STARFLOW_REFERENCE_CASES).

Cross-check (slow): when a second set of cases lies beside the checkout (../shared/reference,
made by another generator from other weights) and is not already the cases directory,
``pytest -m slow`` runs every op of those too (``test_cross_check_op``)."""

import pytest

from starflow_jax.interop import reference_cases as rc

CASE_FILES = rc.discover()
CROSS_CHECK_FILES = (
    rc.discover(rc.SHARED_CASES)
    if rc.SHARED_CASES.is_dir() and rc.SHARED_CASES.resolve() != rc.cases_dir().resolve()
    else []
)
# the cases the repository carries, and what each of them covers (tests/reference_cases/README.md)
REPO_CASE_NAMES = {"pixel_classcond", "t2i_small", "gemma_style_top", "video_small"}


def _params(files, prefix=""):
    out = []
    for path in files:
        case = rc.load_case(path)
        for op in case.ops:
            out.append(pytest.param(path, op["name"], id=f"{prefix}{case.name}-{op['name']}"))
    return out


def test_cases_directory_has_cases():
    assert CASE_FILES, (
        f"no parity cases (*.npz) found in {rc.cases_dir()}; set ${rc.ENV_VAR} to a directory of reference cases "
        "or unset it to use the repository's tests/reference_cases"
    )


def test_repository_carries_its_cases():
    """Whatever $STARFLOW_REFERENCE_CASES says, the checkout holds its own cases, every op of
    the reference that the parity tests know."""
    names = {p.stem for p in rc.discover(rc.REPO_CASES)}
    assert names >= REPO_CASE_NAMES, f"missing from {rc.REPO_CASES}: {sorted(REPO_CASE_NAMES - names)}"
    kinds = {op["op"] for p in rc.discover(rc.REPO_CASES) for op in rc.load_case(p).ops}
    assert kinds == set(rc.EVALUATORS)


_MODELS = {}


def _model(path):
    if path not in _MODELS:
        _MODELS.clear()
        _MODELS[path] = rc.build_model(rc.load_case(path))[0]
    return _MODELS[path]


def _check(path, op_name):
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


@pytest.mark.parametrize("path,op_name", _params(CASE_FILES))
def test_reference_op(path, op_name):
    _check(path, op_name)


@pytest.mark.slow
@pytest.mark.skipif(
    not CROSS_CHECK_FILES,
    reason=f"no second set of cases in {rc.SHARED_CASES} (or it is the cases directory, ${rc.ENV_VAR})",
)
@pytest.mark.parametrize("path,op_name", _params(CROSS_CHECK_FILES, "shared-") or [pytest.param(None, None, id="none")])
def test_cross_check_op(path, op_name):
    _check(path, op_name)
