"""The container files agree with the project: no Docker engine here, so check what can be checked statically."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_dockerfile_runs_medgcsam_offline_as_non_root_with_the_documented_install():
    instr = dockerfile()
    args = {k: [a for i, a in instr if i == k] for k in {i for i, _ in instr}}
    base = re.search(r"BASE_IMAGE=(\S+)", " ".join(args["ARG"])).group(1)
    torch_pin = next(d for d in pyproject()["project"]["dependencies"] if _name(d) == "torch").split("==")[1]
    assert base.startswith(f"pytorch/pytorch:{torch_pin}-cuda"), base

    user = args["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert "HF_HUB_OFFLINE=1" in " ".join(args["ENV"])
    assert args["ENTRYPOINT"] == ['["medgcsam"]']
    assert "medgcsam" in pyproject()["project"]["scripts"]
    volumes = " ".join(args["VOLUME"])
    assert all(v in volumes for v in ('"/data"', '"/weights"', '"/mlflow"'))

    install = next(a for a in args["RUN"] if "pip install" in a).split("&&")[0].strip()
    docs = (ROOT / "docs/container.md").read_text()
    assert install in docs, f"Dockerfile install `{install}` differs from docs/container.md"
    extras = re.search(r'"\.\[([\w,]+)\]"', install).group(1).split(",")
    assert set(extras) <= set(pyproject()["project"]["optional-dependencies"])
    copied = " ".join(args["COPY"])
    for needed in ("pyproject.toml", "constraints.txt", "medgcsam"):
        assert needed in copied
        assert f"!{needed}" in (ROOT / ".dockerignore").read_text()


def test_constraints_pin_every_dependency_and_agree_with_pyproject():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = version
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    deps = project["dependencies"] + extras["dicom"] + extras["server"]
    for dep in deps:
        name = _name(dep)
        if name in ("torch", "torchvision"):  # come with the CUDA base image
            assert name not in pins
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        if "==" in dep:
            assert pins[name] == dep.split("==")[1].strip(), name


def test_compose_has_an_authenticated_tracking_server_with_secrets_in_files_and_gpu_jobs():
    text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert "name" not in compose and "version" not in compose  # Debian's docker-compose 1.29 refuses `name:`
    services = compose["services"]
    assert set(services) == {"db", "mlflow", "train", "predict"}

    server = services["mlflow"]
    assert server["entrypoint"] == ["python", "-m", "medgcsam.tracking.server"]  # MLflow's basic-auth app
    args = " ".join(server["command"])
    assert "--artifacts-destination /mlflow/artifacts" in args and "mlflow:5000" in args.split("--allowed-hosts")[1]
    assert "PASSWORD" not in args and "postgresql" not in args  # no secret on a command line
    env = server["environment"]
    for name in ("POSTGRES_PASSWORD_FILE", "MLFLOW_AUTH_ADMIN_PASSWORD_FILE", "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"):
        assert env[name].startswith("/run/secrets/") and env[name].split("/")[-1] in server["secrets"]
    assert services["db"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert all(s["file"].startswith("./secrets/") for s in compose["secrets"].values())
    assert any(v.startswith("mlflow-artifacts:/mlflow") for v in server["volumes"])
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    assert set(compose["volumes"]) == {"mlflow-db", "mlflow-artifacts"}
    assert "secrets/" in (ROOT / ".gitignore").read_text()

    assert services["train"]["entrypoint"][:2] == ["torchrun", "--standalone"]
    assert services["train"]["entrypoint"][-3:] == ["-m", "medgcsam", "train"]
    assert services["predict"]["entrypoint"] == ["medgcsam", "predict"]
    for job in ("train", "predict"):
        svc = services[job]
        assert svc["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert svc["environment"]["HF_HUB_OFFLINE"] == "1"
        assert svc["env_file"] == "./secrets/mlflow_client.env"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert any(v.endswith(":/data:ro") for v in svc["volumes"])
        assert svc["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_every_documented_model_uri_names_a_model_a_pipeline_or_the_same_snippet_registers():
    """Copied commands must work: a `models:/NAME` in a code block is a pipeline's `register_as`, or the
    same file registers NAME itself (`registered_model_name="NAME"`); NAME, name and m-<id> are placeholders."""
    registered = {yaml.safe_load(p.read_text())["tracking"].get("register_as")
                  for p in (ROOT / "pipelines").rglob("*.yaml") if "tracking" in yaml.safe_load(p.read_text())}
    wrong = []
    for path in [ROOT / "README.md", ROOT / "docker-compose.yml", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        code = text if path.suffix == ".yml" else "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
        own = set(re.findall(r'registered_model_name="([^"]+)"', text))
        for name in re.findall(r"models:/([A-Za-z0-9_.-]+)", code):
            if name not in registered | own and name not in ("NAME", "name") and not name.startswith("m-"):
                wrong.append(f"{path.relative_to(ROOT)}: models:/{name}")
    assert len(registered) >= 3
    assert not wrong, f"documented model URIs no pipeline registers: {wrong}"
