"""Static checks of docker-compose.yml, the Dockerfile and .dockerignore.

There is no Docker engine here, so nothing is built or run (the ``docker`` CLI is never
called): the compose file is parsed with PyYAML (which resolves its ``<<`` merge keys
the way compose does) and its structure is checked against what the code expects.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SETTINGS_SRC = ROOT / "shared" / "settings.py"

APP_SERVICES = ("api", "worker", "worker-gpu")
WORKERS = ("worker", "worker-gpu")
# Read by compose on the host (documented in the compose header), never by the service.
COMPOSE_ONLY_VARS = {"IMGSIM_HOST_DATA"}
_INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def settings_env_names() -> set[str]:
    return set(re.findall(r"IMGSIM_[A-Z_]+", SETTINGS_SRC.read_text()))


def interpolate(value: object) -> str:
    """Resolve compose ``${VAR:-default}`` as if VAR were unset; a bare ``${VAR}`` fails."""
    text = str(value)

    def repl(match: re.Match[str]) -> str:
        if match.group(2) is None:
            raise AssertionError(f"{text!r}: ${{{match.group(1)}}} has no default")
        return match.group(2)

    return _INTERP.sub(repl, text)


def tokens(command: object) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(str(command))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: dict) -> dict[str, dict]:
    """The service's volumes keyed by container path, as ``{source, type, read_only}``."""
    out: dict[str, dict] = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            # Short syntax; a ${VAR:-x} in the source may hold ':' so split from the right.
            parts = entry.rsplit(":", 2) if entry.endswith((":ro", ":rw")) else entry.rsplit(":", 1)
            source, target = parts[0], parts[1]
            read_only = len(parts) == 3 and parts[2] == "ro"
            kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
        else:
            source, target = entry.get("source"), entry["target"]
            read_only = bool(entry.get("read_only", False))
            kind = entry.get("type", "volume")
        out[target] = {"source": source, "type": kind, "read_only": read_only}
    return out


def healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def test_services_exist(services: dict) -> None:
    assert {"redis", "api", "worker", "worker-gpu"} <= set(services)


def test_redis_persists_with_aof_and_has_healthcheck(compose: dict, services: dict) -> None:
    redis = services["redis"]
    assert str(redis["image"]).split(":")[0] == "redis"
    assert str(redis["image"]).split(":")[1].startswith("7")
    command = tokens(redis["command"])
    assert command[0] == "redis-server"
    assert "--appendonly" in command
    assert command[command.index("--appendonly") + 1] == "yes"
    data = mounts(redis)["/data"]
    assert data["type"] == "volume"
    assert data["source"] in compose["volumes"]
    assert "redis-cli ping" in healthcheck_text(redis)


def test_api_runs_gunicorn_on_wsgi_app(services: dict) -> None:
    api = services["api"]
    command = tokens(api["command"])
    assert command[0] == "gunicorn"
    assert command[-1] == "api.wsgi:app"
    assert command[command.index("--bind") + 1] == "0.0.0.0:8000"
    assert any(str(p).split(":")[-1] == "8000" for p in api["ports"])
    # Processes and threads come from gunicorn.conf.py, which the image carries.
    assert "--workers" not in command and "--threads" not in command
    assert "gunicorn.conf.py" in (ROOT / "Dockerfile").read_text()
    assert {"IMGSIM_API_WORKERS", "IMGSIM_API_THREADS"} <= set(api["environment"])


def test_gunicorn_config_uses_threaded_workers_from_the_settings() -> None:
    config: dict = {}
    exec((ROOT / "gunicorn.conf.py").read_text(), config)
    assert config["worker_class"] == "gthread"
    assert config["threads"] > config["_settings"].max_long_polls > 0


def test_api_healthcheck_uses_python_not_curl(services: dict) -> None:
    text = healthcheck_text(services["api"])
    assert "/healthz" in text
    assert "urllib" in text
    assert "curl" not in text
    assert ":8000/" in text


@pytest.mark.parametrize("name", APP_SERVICES)
def test_depends_on_healthy_redis(services: dict, name: str) -> None:
    depends = services[name]["depends_on"]
    assert isinstance(depends, dict), "long form needed to state the condition"
    assert depends["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", WORKERS)
def test_worker_runs_celery_app(services: dict, name: str) -> None:
    command = tokens(services[name]["command"])
    assert command[:4] == ["celery", "-A", "workers.celery_app", "worker"]


@pytest.mark.parametrize("name", WORKERS)
def test_worker_is_scalable(services: dict, name: str) -> None:
    worker = services[name]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker


@pytest.mark.parametrize("name", WORKERS)
def test_worker_healthcheck_pings_its_own_node(services: dict, name: str) -> None:
    text = healthcheck_text(services[name])
    assert "celery -A workers.celery_app inspect ping" in text
    # $$ so compose leaves $HOSTNAME for the container's shell.
    assert "celery@$$HOSTNAME" in text
    assert services[name]["healthcheck"]["test"][0] == "CMD-SHELL"


def test_worker_gpu_reserves_nvidia_gpu_behind_profile(services: dict) -> None:
    gpu = services["worker-gpu"]
    assert "gpu" in gpu["profiles"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert nvidia, devices
    assert "gpu" in nvidia[0]["capabilities"]
    assert nvidia[0].get("count") == "all" or isinstance(nvidia[0].get("count"), int)
    assert environment(gpu)["IMGSIM_DEVICE"] == "cuda"
    # Only the GPU worker is gated and asks for CUDA.
    for name in ("redis", "api", "worker"):
        assert "profiles" not in services[name]
    assert environment(services["worker"])["IMGSIM_DEVICE"] in {"cpu", "auto"}


def test_api_and_workers_share_data_and_artifacts(compose: dict, services: dict) -> None:
    data_sources, artifact_sources = set(), set()
    for name in APP_SERVICES:
        service_mounts = mounts(services[name])
        env = environment(services[name])
        assert env["IMGSIM_DATA_ROOT"] == "/data"
        assert env["IMGSIM_ARTIFACTS_DIR"] == "/artifacts"
        data = service_mounts["/data"]
        assert data["read_only"], f"{name}: the photo folder must be read-only"
        data_sources.add((data["type"], data["source"]))
        artifacts = service_mounts["/artifacts"]
        assert artifacts["type"] == "volume"
        assert artifacts["source"] in compose["volumes"]
        artifact_sources.add(artifacts["source"])
    assert len(data_sources) == 1, data_sources
    assert len(artifact_sources) == 1, artifact_sources
    # Workers write model versions there.
    for name in WORKERS:
        assert not mounts(services[name])["/artifacts"]["read_only"]
    # A named data volume must be declared; a bind mount must be a host path.
    ((kind, source),) = data_sources
    if kind == "volume":
        assert source in compose["volumes"]
    else:
        assert kind == "bind"
        assert interpolate(source).startswith((".", "/", "~"))


def test_settings_regex_matches_dataclass_fields() -> None:
    names = settings_env_names()
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {n.removeprefix("IMGSIM_").lower() for n in names} == fields


def test_compose_imgsim_vars_are_real_settings(services: dict) -> None:
    known = settings_env_names()
    for name in APP_SERVICES:
        keys = {k for k in environment(services[name]) if k.startswith("IMGSIM_")}
        assert keys, name
        assert keys <= known, f"{name}: unknown {sorted(keys - known)}"
        # Every setting can be set from the host (API keys included), none silently dropped.
        assert known <= keys, f"{name}: not passed {sorted(known - keys)}"
    mentioned = set(re.findall(r"IMGSIM_[A-Z0-9_]+", COMPOSE.read_text()))
    assert mentioned - COMPOSE_ONLY_VARS <= known, sorted(mentioned - COMPOSE_ONLY_VARS - known)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_environment_is_accepted_by_settings(services: dict, name: str) -> None:
    env = {k: interpolate(v) for k, v in environment(services[name]).items()}
    settings = Settings.from_env(env)
    url = urlparse(settings.redis_url)
    assert url.scheme == "redis"
    assert url.hostname == "redis" and "redis" in services
    assert (url.port or 6379) == 6379
    # Pass-through defaults agree with the service's own defaults.
    defaults = Settings()
    chosen_by_compose = {"redis_url", "data_root", "artifacts_dir", "device"}
    for field in {f.name for f in dataclasses.fields(Settings)} - chosen_by_compose:
        assert getattr(settings, field) == getattr(defaults, field), field


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_project_as_non_root() -> None:
    assert DOCKERFILE.is_file()
    instructions = dockerfile_instructions()
    assert [rest for kw, rest in instructions if kw == "FROM"] == ["python:3.11-slim"]
    assert ("WORKDIR", "/app") in instructions
    copied = " ".join(rest for kw, rest in instructions if kw == "COPY")
    for item in ("api/", "workers/", "shared/", "pyproject.toml", "README.md"):
        assert item in copied.split(), item
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    assert any("pip install" in r and '".[worker]"' in r for r in runs), runs
    assert any("download.pytorch.org/whl/cpu" in rest for kw, rest in instructions
               if kw in {"ARG", "RUN"})
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in {"root", "0"}
    # The install must run before the switch to the unprivileged user.
    keywords = [kw for kw, _ in instructions]
    install = next(i for i, (kw, r) in enumerate(instructions)
                   if kw == "RUN" and "pip install" in r)
    assert install < len(keywords) - 1 - keywords[::-1].index("USER")


def test_compose_build_args_are_declared_in_dockerfile(services: dict) -> None:
    declared = {rest.split("=")[0] for kw, rest in dockerfile_instructions() if kw == "ARG"}
    for name in APP_SERVICES:
        build = services[name].get("build")
        assert build, f"{name} must build the image"
        args = build.get("args", {}) if isinstance(build, dict) else {}
        assert set(args) <= declared, name
    assert "cu" in services["worker-gpu"]["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]


def test_dockerignore_keeps_context_small() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "var", ".pytest_cache"} <= patterns
    for kept in ("api", "workers", "shared", "pyproject.toml", "README.md"):
        assert kept not in patterns
