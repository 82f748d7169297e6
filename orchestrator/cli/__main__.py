"""`python -m orchestrator.cli …`: what a Ray Jobs API entrypoint runs on the cluster."""
import sys

from orchestrator.cli import main

sys.exit(main())
