"""`ray job submit` entrypoint: the `enrich` command run as the job's driver.

Inside a Ray job RAY_ADDRESS is set, so the pipeline attaches to the cluster instead of starting its own Ray.
The cluster's image has enrich-dist installed; the job's working dir is this folder only. Example:

    ray job submit --address http://HEAD:8265 --working-dir jobs --runtime-env jobs/runtime_env.yaml \
        -- python enrich_job.py run --input s3://archive/images --output s3://runs/nightly

`python jobs/submit.py` builds that command and adds the S3 endpoint of the submitting shell. Nightly
into dated run dirs (``--output s3://runs/nightly/YYYY-MM-DD``), add ``--previous-run latest`` to reuse
the last finished night's encoder and embeddings (docs/operations.md, *Nightly incremental runs*).
"""

import sys

from enrich_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
