"""`ray job submit` entrypoint for one stage:

    ray job submit --working-dir . -- python jobs/run_stage.py seeds --preset paper-7b run.root=s3://bucket/runs
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir

from scoder_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["stage", *sys.argv[1:]]))
