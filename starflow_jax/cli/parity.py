"""``starflow-jax parity``: check this implementation against a directory of reference cases."""

from __future__ import annotations

import json

from starflow_jax.interop import reference_cases as rc


def add_parser(sub):
    p = sub.add_parser("parity", help="compare with PyTorch reference cases (.npz) and print the worst error per op")
    p.add_argument(
        "--cases",
        default=None,
        help=f"directory of cases (default: ${rc.ENV_VAR}, else tests/reference_cases of this checkout)",
    )
    p.add_argument("--json", help="also write the table to this JSON file")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    directory = args.cases or rc.cases_dir()
    files = rc.discover(directory)
    if not files:
        raise FileNotFoundError(
            f"no *.npz cases in {directory}: pass --cases DIR (or set ${rc.ENV_VAR}); the cases are in "
            "tests/reference_cases of a source checkout"
        )
    rows, failed = [], 0
    print(f"{'case':<20}{'op':<28}{'outputs':>8}  {'worst err':>10}  {'tolerance':>9}  {'status':<8}worst output")
    for path in files:
        case = rc.load_case(path)
        model, _ = rc.build_model(case)
        for op in case.ops:
            res = rc.evaluate_op(case, op, model)
            worst = max(res, key=lambda r: r.err / r.tol)
            ok = all(r.ok for r in res)
            failed += not ok
            rows.append(
                dict(
                    case=case.name,
                    op=op["name"],
                    status="pass" if ok else "FAIL",
                    outputs=len(res),
                    worst_err=worst.err,
                    tolerance=worst.tol,
                    worst_output=worst.key,
                )
            )
            print(
                f"{case.name:<20}{op['name']:<28}{len(res):>8}  {worst.err:>10.3e}  {worst.tol:>9.1e}  "
                f"{'pass' if ok else 'FAIL':<8}{worst.key}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if failed else 0
