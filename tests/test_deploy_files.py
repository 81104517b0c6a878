"""The deploy files, checked statically (no Docker engine here): docker-compose.yml parsed with PyYAML for its
services, healthchecks, volumes and environment; the Dockerfiles for what they install."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {name: deps for name, deps in project["optional-dependencies"].items()}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (DOCKER / dockerfile).read_text().splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(args.split())))
    return result


def pip_installs(dockerfile: str) -> list[str]:
    """Every `pip install ...` command of the RUN instructions."""
    commands = [c.strip() for kw, args in instructions(dockerfile) if kw == "RUN" for c in args.split("&&")]
    return [c for c in commands if re.match(r"(python\d? -m )?pip install", c)]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of the service's volumes (short syntax; a source may hold ':' itself)."""
    result = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        mode = parts.pop() if parts[-1] in ("ro", "rw") else "rw"
        target = parts.pop()
        result[target] = (":".join(parts), mode)
    return result


def test_compose_has_redis_trainer_api_and_a_gpu_api(compose: dict[str, Any]) -> None:
    assert {"redis", "trainer", "api", "api-gpu"} <= set(compose["services"])
    assert "profiles" not in compose["services"]["api"]
    assert compose["services"]["api-gpu"]["profiles"] == ["gpu"]


def test_compose_redis_persists_to_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command
    source, mode = mounts(redis)["/data"]
    assert source in compose["volumes"] and mode == "rw"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


@pytest.mark.parametrize("name", ["api", "api-gpu"])
def test_compose_api_waits_for_redis_and_the_trainer_and_checks_readyz(compose: dict[str, Any], name: str) -> None:
    api = compose["services"][name]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert any("/readyz" in part for part in api["healthcheck"]["test"])
    assert api["healthcheck"]["retries"] >= 1


@pytest.mark.parametrize("name", ["api", "api-gpu"])
def test_compose_api_reads_the_trainers_bundle_read_only_and_uses_redis(compose: dict[str, Any], name: str) -> None:
    api, trainer = compose["services"][name], compose["services"]["trainer"]
    env = env_of(api)
    assert env["MMREC_REDIS_URL"].startswith("redis://redis:6379")
    bundle_volume, mode = mounts(api)["/bundles"]
    assert mode == "ro" and bundle_volume in compose["volumes"]
    assert mounts(trainer)["/bundles"] == (bundle_volume, "rw")
    assert env["MMREC_BUNDLE_DIR"] == "/bundles/current"
    assert "--bundle-out /bundles/current" in " ".join(trainer["command"])
    assert "MMREC_API_KEY" in env


def test_compose_trainer_is_a_one_shot_job(compose: dict[str, Any]) -> None:
    trainer = compose["services"]["trainer"]
    assert trainer["restart"] == "no"
    assert trainer["build"]["dockerfile"] == "docker/trainer.Dockerfile"
    assert "mmrec pipeline" in " ".join(trainer["command"])


def test_compose_gpu_api_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    api_gpu = compose["services"]["api-gpu"]
    devices = api_gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert env_of(api_gpu)["MMREC_DEVICE"] == "cuda"
    assert api_gpu["build"]["dockerfile"] == "docker/service-gpu.Dockerfile"
    published = {p.split(":")[0] for s in ("lb", "api-gpu") for p in compose["services"][s]["ports"]}
    assert len(published) == 2  # both can run at once


def test_compose_environment_names_real_settings(compose: dict[str, Any]) -> None:
    from service.cli import ACCESS_LOG_ENV, LOG_LEVEL_ENV
    from service.settings import ServiceSettings

    for name in ("api", "api-gpu"):
        for key in env_of(compose["services"][name]):
            assert key in (ACCESS_LOG_ENV, LOG_LEVEL_ENV) or key.removeprefix("MMREC_").lower() in ServiceSettings.model_fields, key


def test_compose_builds_dockerfiles_that_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_cpu_image_installs_only_the_serve_extra_and_never_torch(extras: dict[str, list[str]]) -> None:
    assert pip_installs("service-cpu.Dockerfile") == ['pip install ".[serve]"']
    assert all("torch" not in args.lower() for _, args in instructions("service-cpu.Dockerfile"))
    assert not any(dep.lower().startswith("torch") for dep in extras["serve"])
    copied = [args for kw, args in instructions("service-cpu.Dockerfile") if kw == "COPY"]
    assert copied == ["pyproject.toml README.md ./", "bundle_format ./bundle_format", "service ./service"]  # no models/, no training/
    assert instructions("service-cpu.Dockerfile")[0][1].startswith("python:3.11-slim")


def test_gpu_image_installs_the_serve_and_gpu_extras_without_torch(extras: dict[str, list[str]]) -> None:
    installs = pip_installs("service-gpu.Dockerfile")
    assert installs[0] == 'pip install ".[serve,gpu]"'
    assert all("torch" not in c and "[train" not in c for c in installs)
    assert instructions("service-gpu.Dockerfile")[0][1].startswith("nvidia/cuda:")
    gpu_wheels = {re.split(r"[<>=]", d)[0] for d in extras["gpu"]}
    assert gpu_wheels == {"onnxruntime-gpu", "faiss-gpu-cu12"}
    assert installs[-1].endswith("onnxruntime-gpu faiss-gpu-cu12")


def test_trainer_image_installs_cpu_torch_and_the_train_extra() -> None:
    installs = pip_installs("trainer.Dockerfile")
    assert installs == ["pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", 'pip install ".[train]"']


@pytest.mark.parametrize("dockerfile", ["service-cpu.Dockerfile", "service-gpu.Dockerfile", "trainer.Dockerfile"])
def test_images_run_as_the_same_non_root_user(dockerfile: str) -> None:
    parsed = instructions(dockerfile)
    users = [args for kw, args in parsed if kw == "USER"]
    assert users == ["mmrec"]
    useradd = next(args for kw, args in parsed if kw == "RUN" and "useradd" in args)
    assert "--uid 10001" in useradd  # one uid in every image: the api reads what the trainer wrote
    assert [kw for kw, _ in parsed].index("USER") > max(i for i, (kw, args) in enumerate(parsed) if kw == "RUN")


def test_trainer_image_owns_its_volume_mount_points_before_declaring_them() -> None:
    parsed = instructions("trainer.Dockerfile")
    volumes = next(args for kw, args in parsed if kw == "VOLUME")
    chown = next(args for kw, args in parsed if kw == "RUN" and "chown" in args)
    for mount in ("/bundles", "/var/lib/mmrec"):
        assert mount in volumes and mount in chown.split("chown", 1)[1]
    assert [kw for kw, _ in parsed].index("USER") < [kw for kw, _ in parsed].index("VOLUME")


@pytest.mark.parametrize("dockerfile", ["service-cpu.Dockerfile", "service-gpu.Dockerfile"])
def test_service_images_run_mmrec_serve_as_non_root_with_a_readyz_healthcheck(dockerfile: str) -> None:
    parsed = instructions(dockerfile)
    keywords = [kw for kw, _ in parsed]
    assert "USER" in keywords and dict(parsed)["USER"] != "root"
    assert "/readyz" in dict(parsed)["HEALTHCHECK"]
    assert dict(parsed)["CMD"].startswith('["mmrec-serve", "--host", "0.0.0.0"')


# --- secure by default, several replicas behind a load balancer ---


def resolved_env(service: dict[str, Any], **variables: str) -> dict[str, str]:
    """The service's environment as compose interpolates it: ``${VAR:-default}`` and ``${VAR:?error}`` from
    ``variables``, else the default; an unset ``${VAR:?error}`` raises, as ``docker compose up`` would refuse."""

    def one(match: re.Match[str]) -> str:
        name, kind, text = match["name"], match["kind"], match["text"]
        if variables.get(name):
            return variables[name]
        if kind == ":?":
            raise LookupError(f"{name}: {text}")
        return text

    return {k: re.sub(r"\$\{(?P<name>\w+)(?P<kind>:-|:\?)(?P<text>[^}]*)\}", one, v) for k, v in env_of(service).items()}


@pytest.mark.parametrize("name", ["api", "api-gpu"])
def test_compose_refuses_to_start_without_an_api_key(compose: dict[str, Any], name: str) -> None:
    api = compose["services"][name]
    assert re.fullmatch(r"\$\{MMREC_API_KEY:\?.*MMREC_API_KEY.*README.*\}", env_of(api)["MMREC_API_KEY"])
    with pytest.raises(LookupError, match="set MMREC_API_KEY \\(at least 16 characters"):
        resolved_env(api)


@pytest.mark.parametrize("name", ["api", "api-gpu"])
def test_compose_api_environment_is_valid_settings_with_a_key(compose: dict[str, Any], name: str) -> None:
    from service.settings import ServiceSettings

    env = resolved_env(compose["services"][name], MMREC_API_KEY="k" * 32)
    # MMREC_SERVE_* are the process's switches (service/cli.py: log level, access log), not ServiceSettings fields
    settings = ServiceSettings(**{k.removeprefix("MMREC_").lower(): v for k, v in env.items()
                                  if not k.startswith("MMREC_SERVE_")})  # fmt: skip
    assert [k.name for k in settings.keys] == ["api_key"] and settings.read_access == "open"
    assert not settings.allow_open_writes


def test_compose_api_replicas_sit_behind_the_load_balancer(compose: dict[str, Any]) -> None:
    api, lb = compose["services"]["api"], compose["services"]["lb"]
    # `docker compose up --scale api=N` needs replicas without a fixed host port or container name.
    assert "ports" not in api and "container_name" not in api and "8000" in [str(p) for p in api["expose"]]
    assert lb["image"].startswith("nginx:")
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    assert lb["ports"] == ["8000:8000"]
    source, mode = mounts(lb)["/etc/nginx/conf.d/default.conf"]
    assert (ROOT / source).resolve() == DOCKER / "nginx.conf" and mode == "ro"
    assert any("/readyz" in part for part in lb["healthcheck"]["test"])
    # The replicas take the client's address from lb's X-Forwarded-For: only lb can reach them (no published port).
    assert env_of(api)["MMREC_FORWARDED_ALLOW_IPS"] == "*"
    # lb keeps the access log; the replicas do not write a second one
    assert env_of(api)["MMREC_SERVE_ACCESS_LOG"] == "false"


def nginx_directives() -> list[tuple[str, str]]:
    """(directive, arguments) of docker/nginx.conf: comments dropped, blocks flattened."""
    text = "\n".join(line.split("#", 1)[0] for line in (DOCKER / "nginx.conf").read_text().splitlines())
    statements = re.split(r"[;{}]", text)
    return [(s.split()[0], " ".join(s.split()[1:])) for s in statements if s.split()]


def test_nginx_conf_spreads_requests_over_every_replica_and_passes_the_client_address() -> None:
    from service.settings import ServiceSettings

    directives = nginx_directives()
    values = dict(directives)
    assert values["resolver"].startswith("127.0.0.11 valid=")  # Docker's DNS: every replica of `api`, re-resolved
    assert values["set"] == "$api http://api:8000" and values["proxy_pass"] == "$api"
    assert values["listen"] == "8000"
    headers = {args.split()[0]: args.split(None, 1)[1] for d, args in directives if d == "proxy_set_header"}
    assert headers["X-Forwarded-For"] == "$remote_addr"  # overwritten, so a client cannot pick its own address
    size = values["client_max_body_size"]
    assert int(size.rstrip("m")) * 1024 * 1024 > ServiceSettings.model_fields["max_body_bytes"].default
    assert "non_idempotent" not in values["proxy_next_upstream"]  # a write is never sent twice


def test_nginx_access_log_leaves_query_strings_out() -> None:
    directives = nginx_directives()
    log_format = next(args for d, args in directives if d == "log_format")
    assert log_format.startswith("mmrec ") and "$uri" in log_format
    for leaky in ("$request ", "$request\"", "$request_uri", "$args", "$query_string", "$http_x_api_key"):
        assert leaky not in log_format
    assert dict(directives)["access_log"].endswith(" mmrec")


def test_readme_documents_replicas_and_the_key() -> None:
    deploying = (ROOT / "README.md").read_text().split("## Deploying", 1)[1].split("\n## ", 1)[0]
    assert "docker compose up --scale api=3" in deploying
    assert "MMREC_API_KEY" in deploying and "refuses" in deploying


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("heavy", [".venv", "var", ".git", ".env", "**/__pycache__", "tests", "bench/results"])
def test_dockerignore_keeps_the_virtualenv_data_and_secrets_out_of_the_build_context(heavy: str) -> None:
    assert heavy in _dockerignore_patterns()


@pytest.mark.parametrize("dockerfile", ["service-cpu.Dockerfile", "service-gpu.Dockerfile", "trainer.Dockerfile"])
def test_dockerignore_excludes_nothing_an_image_copies(dockerfile: str) -> None:
    ignored = {p for p in _dockerignore_patterns() if "*" not in p}
    copied = [src for kw, args in instructions(dockerfile) if kw == "COPY" and "--from" not in args for src in args.split()[:-1]]
    assert copied
    for source in copied:
        assert source.split("/")[0] not in ignored, f"{dockerfile} copies {source}, which .dockerignore leaves out"


@pytest.mark.parametrize("dockerfile", ["service-cpu.Dockerfile", "service-gpu.Dockerfile"])
def test_service_images_copy_every_package_the_service_imports(dockerfile: str) -> None:
    import ast

    copied = {src.split("/")[0] for kw, args in instructions(dockerfile) if kw == "COPY" for src in args.split()[:-1]}
    local = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {p.stem for p in ROOT.glob("*.py")}
    imported: set[str] = set()
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
    needed = imported & local
    assert "service" in needed
    for package in needed:
        assert package in copied or f"{package}.py" in copied, f"{dockerfile} does not copy {package}, which service/ imports"


def test_compose_trainer_picks_the_multimodal_dataset_when_the_shared_data_is_mounted(compose: dict[str, Any]) -> None:
    trainer = compose["services"]["trainer"]
    command = " ".join(trainer["command"])
    assert "mmrec pipeline" in command and "--dataset" not in command, "a fixed --dataset would skip ml100k-posters"
    assert env_of(trainer)["MMREC_DATA_ROOT"] == "/data"
    assert any(str(volume).endswith(":/data:ro") for volume in trainer["volumes"])
