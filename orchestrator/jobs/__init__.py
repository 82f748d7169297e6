"""Training jobs: the controller, pipelines, Ray Jobs API submission, status, reports."""
