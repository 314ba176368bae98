"""`ray job submit` entrypoint for the whole loop:

    ray job submit --working-dir . -- python jobs/run_loop.py --preset paper-7b run.root=s3://bucket/runs

Inside a job RAY_ADDRESS is set, so the driver joins the job's cluster instead of starting one.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir

from scoder_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
