"""``starflow-jax bench``: benchmarks that print a table and write JSON."""

from __future__ import annotations

from starflow_jax.bench import jacobi_bench, sample_bench, train_bench, vae_bench


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="benchmarks (sampling, training, the Wan VAE), side by side with the reference when given"
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    sample_bench.add_parser(bsub)
    jacobi_bench.add_parser(bsub)
    train_bench.add_parser(bsub)
    vae_bench.add_parser(bsub)
    return p
