"""`ray job submit` entrypoint: the `enrich` command run as the job's driver.

Inside a Ray job RAY_ADDRESS is set, so the pipeline attaches to the cluster instead of starting
its own Ray. Example:

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml --working-dir . \
        -- python jobs/enrich_job.py run --input s3://archive/images --output s3://runs/nightly
"""

import sys

from enrich_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
