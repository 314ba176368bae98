"""A local S3-compatible server (moto's standalone server) on 127.0.0.1: what the tests and
bench/store.py use as an object-store run root, and a way to try `run.root=s3://...` without a cloud.

    python -m scoder_ray.s3_local --port 9000 --bucket runs     # prints the variables to export
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Dummy credentials: moto accepts any; real stores take theirs from the provider's chain, never from here.
CLIENT_ENV = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
              "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int = 0, buckets: tuple[str, ...] = ()) -> tuple[subprocess.Popen, dict[str, str]]:
    """(server process, the environment a client needs). Buckets are created with Arrow's S3 client."""
    port = port or free_port()
    moto = str(Path(sys.executable).with_name("moto_server"))
    log = open(tempfile.mkstemp(prefix="moto-", suffix=".log")[1], "w")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}; see {log.name}") from None
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": url, **CLIENT_ENV}
    for bucket in buckets:
        create_bucket(bucket, env)
    proc.log_path = log.name  # removed by stop()
    return proc, env


def stop(proc: subprocess.Popen) -> None:
    """End a server start() began, and remove its log."""
    proc.terminate()
    proc.wait(timeout=30)
    Path(proc.log_path).unlink(missing_ok=True)


def create_bucket(bucket: str, env: dict[str, str]) -> None:
    import boto3  # moto's own dependency; its sockets are the calling thread's (Arrow's use an I/O pool)

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                 region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--bucket", action="append", default=[])
    args = p.parse_args()
    proc, env = start(args.port, tuple(args.bucket))
    print("".join(f"export {k}={v}\n" for k, v in env.items()), flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        return 0


if __name__ == "__main__":
    sys.exit(main())
