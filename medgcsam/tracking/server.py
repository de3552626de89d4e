"""`python -m medgcsam.tracking.server [mlflow server options]`: the tracking server of docker-compose.yml.

It runs MLflow's basic-auth app, and no secret ever appears on a command line (where `ps` and
``/proc/PID/cmdline`` show it to every user of the host): each secret comes from ``NAME`` or from the
file named by ``NAME_FILE`` (a Compose secret), and reaches MLflow through its environment:

- ``POSTGRES_PASSWORD``: the database password; with ``POSTGRES_USER/DB/HOST/PORT`` it makes
  ``MLFLOW_BACKEND_STORE_URI`` (unless that is given whole, as for a sqlite store);
- ``MLFLOW_AUTH_ADMIN_PASSWORD``: the first admin's password (user ``MLFLOW_AUTH_ADMIN_USERNAME``, default
  ``admin``), used only when the user store is empty;
- ``MLFLOW_FLASK_SERVER_SECRET_KEY``: signs the app's CSRF tokens.

Users live in ``MLFLOW_AUTH_DATABASE_URI`` (default: a sqlite file beside the artifacts, on the volume).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

DEFAULT_AUTH_DB = "sqlite:////mlflow/basic_auth.db"


class ServerConfigError(ValueError):
    """A secret or setting the server cannot start without; the message names it and how to give it."""


def secret(environ: Mapping[str, str], name: str) -> str:
    """``name`` from the environment, or the content of the file ``name_FILE`` names (trailing newline dropped)."""
    path = environ.get(f"{name}_FILE")
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ServerConfigError(f"{name}_FILE={path}: cannot read it ({exc.strerror}); mount the secret "
                                    f"there or set {name}") from None
    else:
        value = environ.get(name, "")
    if not value:
        raise ServerConfigError(f"{name} is not set: give it in the environment or as a file named by {name}_FILE "
                                f"(docker-compose.yml reads ./secrets/; see docs/container.md)")
    return value


def server_environment(environ: Mapping[str, str], config_dir: Path) -> dict[str, str]:
    """The environment ``mlflow server --app-name basic-auth`` runs with: secrets resolved, ``*_FILE`` dropped."""
    env = {k: v for k, v in environ.items() if not k.endswith("_FILE")}
    if not env.get("MLFLOW_BACKEND_STORE_URI"):
        password = quote(secret(environ, "POSTGRES_PASSWORD"), safe="")
        env["MLFLOW_BACKEND_STORE_URI"] = (
            f"postgresql+pg8000://{environ.get('POSTGRES_USER', 'mlflow')}:{password}@"
            f"{environ.get('POSTGRES_HOST', 'db')}:{environ.get('POSTGRES_PORT', '5432')}/"
            f"{environ.get('POSTGRES_DB', 'mlflow')}")
    env.pop("POSTGRES_PASSWORD", None)
    env["MLFLOW_AUTH_ADMIN_USERNAME"] = environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = secret(environ, "MLFLOW_AUTH_ADMIN_PASSWORD")
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret(environ, "MLFLOW_FLASK_SERVER_SECRET_KEY")
    ini = config_dir / "basic_auth.ini"
    # no secret in this file: the admin password stays in the environment
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = {environ.get('MLFLOW_AUTH_DATABASE_URI', DEFAULT_AUTH_DB)}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n", encoding="utf-8")
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    return env


def main(argv: Sequence[str] | None = None) -> None:
    """Replace this process with the MLflow server (so signals from `docker stop` reach it directly)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        env = server_environment(os.environ, Path(tempfile.mkdtemp(prefix="mlflow-auth-")))
    except ServerConfigError as exc:
        sys.exit(f"error: {exc}")
    os.execvpe(sys.executable, [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", *args], env)


if __name__ == "__main__":
    main()
