"""MLflow tracking: store resolution, fail-fast reachability, outage-tolerant metrics, provenance."""

from medgcsam.tracking.logger import ResilientMetricLogger, fail_fast_http
from medgcsam.tracking.provenance import git_commit, package_versions, run_params
from medgcsam.tracking.uri import (
    TrackingError,
    activate,
    artifact_location,
    ensure_experiment,
    ensure_reachable,
    ensure_writable,
    resolve_tracking_uri,
)

__all__ = [
    "ResilientMetricLogger",
    "TrackingError",
    "activate",
    "artifact_location",
    "ensure_experiment",
    "ensure_reachable",
    "ensure_writable",
    "fail_fast_http",
    "git_commit",
    "package_versions",
    "resolve_tracking_uri",
    "run_params",
]
