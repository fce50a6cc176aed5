"""The cluster files (docker-compose.yml, Dockerfile, .dockerignore) checked without Docker: services, commands,
ports and environment names must agree with each other and with `StorageSettings`.

Each check returns the problems it finds, so the mutation tests below prove on edited copies that the same
checks catch a misspelt setting, a port or Ray address that disagrees, a scaled service with a fixed name, ...
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from quantplan.settings import StorageSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
SERVICES = {"postgres", "ray-head", "ray-worker", "api"}
# QUANTPLAN_* variables that the code reads besides the settings fields (each must occur in the sources)
EXTRA_ENV = {"QUANTPLAN_CACHE_DIR", "QUANTPLAN_CONFIG", "QUANTPLAN_DATASETS_CACHE"}
# what the shell or .env gives `docker compose`; everything else takes the file's defaults
SHELL_ENV = {"QUANTPLAN_API_TOKENS": "ci=0123456789abcdef"}
NAME = re.compile(r"QUANTPLAN_[A-Z0-9_]+")


# -- compose-file reading -------------------------------------------------------------------------------------
class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset, as `docker compose` reports it."""


_VAR = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        value, op = env.get(name), m.group("op") or ""
        unset = value is None or (op.startswith(":") and value == "")
        if unset and op.endswith("?"):
            raise MissingVariable(f"{name}: {m.group('arg')}")
        if unset:
            return m.group("arg") if op.endswith("-") else ""
        return value

    return _VAR.sub(sub, text)


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    """The parsed file with every string interpolated (what `docker compose config` shows)."""
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def load_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))


def strings(node: Any) -> Iterator[str]:
    """Every key and string value in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def commands(service: dict) -> list[list[str]]:
    """The argv of each simple command a service runs (`sh -c "a && exec b"` gives [a, b])."""
    cmd = service.get("command") or []
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
    if argv[:2] in (["sh", "-c"], ["bash", "-c"], ["/bin/sh", "-c"]):
        parts = re.split(r"&&|;|\n", argv[2])
        argv_list = [shlex.split(p) for p in parts if p.strip()]
        return [a[1:] if a[:1] == ["exec"] else a for a in argv_list]
    return [argv]


def find_command(service: dict, *prefix: str) -> list[str] | None:
    return next((a for a in commands(service) if a[: len(prefix)] == list(prefix)), None)


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE`, else None."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def published_targets(service: dict) -> dict[int, str]:
    """Container port -> published host part, for the short ("8000:8000") and long port syntax."""
    out: dict[int, str] = {}
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out[int(p["target"])] = str(p.get("published", ""))
        else:
            host, _, target = str(p).split("/")[0].rpartition(":")
            out[int(target)] = host
    return out


def mounts(service: dict) -> dict[str, str]:
    """Container path -> volume name or host path."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            source, _, rest = v.partition(":")
            out[rest.split(":")[0]] = source
    return out


def on_volume(service: dict, path: str) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts(service))


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", text.strip().lower())
    assert m, f"cannot read the size {text!r}"
    return int(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " ")


# -- the checks -----------------------------------------------------------------------------------------------
def known_env_names() -> set[str]:
    return {"QUANTPLAN_" + name.upper() for name in StorageSettings.model_fields} | EXTRA_ENV


def unknown_env_names(text_or_tree: Any) -> set[str]:
    """QUANTPLAN_* names (environment keys, ${...} references, anywhere) that no code reads."""
    found = set(NAME.findall(text_or_tree if isinstance(text_or_tree, str) else "\n".join(strings(text_or_tree))))
    return found - known_env_names()


def check_compose(raw: dict, shell_env: Mapping[str, str] = SHELL_ENV) -> list[str]:
    """Every problem found in a parsed docker-compose.yml (empty when it is consistent)."""
    problems = [f"unknown setting {n} (not a StorageSettings field nor one of {sorted(EXTRA_ENV)})"
                for n in sorted(unknown_env_names(raw))]
    compose = resolve(raw, shell_env)
    services = compose.get("services") or {}
    if missing := SERVICES - set(services):
        return [*problems, f"missing services {sorted(missing)}"]
    for check in (_check_api, _check_ray, _check_postgres, _check_scaling, _check_volumes):
        problems += check(compose, services)
    return problems


def _check_api(compose: dict, services: dict) -> list[str]:
    api, problems = services["api"], []
    serve = find_command(api, "quantplan", "serve")
    if serve is None:
        return ["the api command does not run `quantplan serve`"]
    if option(serve, "--host") != "0.0.0.0":
        problems.append(f"quantplan serve listens on {option(serve, '--host')}, not 0.0.0.0: unreachable from outside")
    port = int(option(serve, "--port") or 8000)
    if port not in published_targets(api):
        problems.append(f"the api serves port {port} but publishes {sorted(published_targets(api))}")
    health = " ".join(map(str, (api.get("healthcheck") or {}).get("test", [])))
    if health and f":{port}/healthz" not in health:
        problems.append(f"the api healthcheck does not ask :{port}/healthz: {health}")
    env = environment(api)
    for name, path in (("QUANTPLAN_ARTIFACTS", "/data/artifacts"), ("QUANTPLAN_CACHE_DIR", None), ("HF_HOME", None)):
        value = env.get(name, path)
        if not value or not on_volume(api, value):
            problems.append(f"{name}={value} is not on a volume in the api: it is lost with the container")
    return problems


def _check_ray(compose: dict, services: dict) -> list[str]:
    problems = []
    address = environment(services["api"]).get("QUANTPLAN_RAY_ADDRESS", "")
    host, _, port = address.rpartition(":")
    head = find_command(services["ray-head"], "ray", "start")
    if head is None or "--head" not in head or "--block" not in head:
        return ["ray-head does not run `ray start --head ... --block`"]
    if host != "ray-head" or port != option(head, "--port"):
        problems.append(f"QUANTPLAN_RAY_ADDRESS={address} is not ray-head:{option(head, '--port')} (the head's GCS)")
    for name in ("ray-worker", "api"):
        joined = find_command(services[name], "ray", "start")
        if joined is None:
            problems.append(f"{name} does not join the Ray cluster (a Ray driver needs a local Ray node too)")
        elif option(joined, "--address") != address:
            problems.append(f"{name} joins Ray at {option(joined, '--address')}, the runner at {address}")
    for name in ("ray-head", "ray-worker", "api"):
        store = option(find_command(services[name], "ray", "start") or [], "--object-store-memory")
        shm = services[name].get("shm_size")
        if not shm or (store and int(store) >= size_bytes(str(shm))):
            problems.append(f"{name}: the object store ({store}) must fit in shm_size ({shm}), the size of /dev/shm")
    if "--block" not in (find_command(services["ray-worker"], "ray", "start") or []):
        problems.append("ray-worker's `ray start` lacks --block: the container would exit at once")
    if option(find_command(services["api"], "ray", "start") or [], "--num-cpus") != "0":
        problems.append("the api's Ray node should take no tasks (--num-cpus=0)")
    return problems


def _check_postgres(compose: dict, services: dict) -> list[str]:
    pg, api, problems = services["postgres"], services["api"], []
    env = environment(pg)
    url = make_url(environment(api).get("QUANTPLAN_DATABASE_URL", "sqlite://"))
    expected = ("postgres", 5432, env.get("POSTGRES_USER"), env.get("POSTGRES_PASSWORD"), env.get("POSTGRES_DB"))
    actual = (url.host, url.port or 5432, url.username, url.password, url.database)
    if not url.drivername.startswith("postgresql") or actual != expected:
        shown = (*expected[:3], "***", expected[4])
        problems.append(f"QUANTPLAN_DATABASE_URL {url!r} does not match the postgres service {shown}")
    if "pg_isready" not in " ".join(map(str, (pg.get("healthcheck") or {}).get("test", []))):
        problems.append("postgres has no pg_isready healthcheck")
    if not any(m == "/var/lib/postgresql/data" for m in mounts(pg)):
        problems.append("postgres keeps its data in the container, not on a volume")
    depends = api.get("depends_on") or {}
    if not isinstance(depends, dict) or (depends.get("postgres") or {}).get("condition") != "service_healthy":
        problems.append("the api does not wait for postgres to be healthy (depends_on condition: service_healthy)")
    if "ray-head" not in depends:
        problems.append("the api does not depend on ray-head")
    return problems


def _check_scaling(compose: dict, services: dict) -> list[str]:
    worker, problems = services["ray-worker"], []
    if "container_name" in worker:
        problems.append("ray-worker has a container_name: `--scale ray-worker=N` would clash")
    if any(host for host in published_targets(worker).values()):
        problems.append("ray-worker publishes a fixed host port: `--scale ray-worker=N` would clash")
    return problems


def _check_volumes(compose: dict, services: dict) -> list[str]:
    declared, problems = set(compose.get("volumes") or {}), []
    for name, service in services.items():
        for target, source in mounts(service).items():
            if source and not source.startswith((".", "/", "~")) and source not in declared:
                problems.append(f"{name} mounts volume {source!r} at {target}, not declared under volumes:")
    for name in ("api", "ray-head", "ray-worker"):
        if mounts(services[name]).get("/models") != "models":
            problems.append(f"{name} does not mount the models volume at /models")
        if services[name].get("image") != services["api"].get("image"):
            problems.append(f"{name} runs another image than the api: Ray needs one version on every node")
    return problems


# -- Dockerfile -----------------------------------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):  # comments, also between continuation lines, and parser directives
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def _expand_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def check_dockerfile(text: str) -> list[str]:
    """Every problem found in a Dockerfile (empty when it is right)."""
    steps, args, problems = instructions(text), {}, []
    problems += [f"unknown setting {n} in the Dockerfile" for n in sorted(unknown_env_names(text))]
    base = [a for k, a in steps if k == "FROM"]
    if base != ["python:3.11-slim"]:
        problems.append(f"the image should be built FROM python:3.11-slim in one stage, not {base}")
    runs = []
    for keyword, arg in steps:
        if keyword == "ARG":
            name, _, default = arg.partition("=")
            args[name] = default.strip('"')
        elif keyword == "RUN":
            runs.append(_expand_args(arg, args))
    torch_pin = re.search(r"torch==([\w.+]+)", (REPO / "Makefile").read_text(encoding="utf-8"))
    torch_step = next((i for i, r in enumerate(runs) if "pip install" in r and "torch==" in r), None)
    if torch_step is None:
        return [*problems, "no RUN step installs a pinned torch"]
    torch_run = runs[torch_step]
    if "--index-url https://download.pytorch.org/whl/cpu" not in torch_run.replace('"', ""):
        problems.append(f"torch is not installed from the CPU wheel index: {torch_run}")
    if torch_pin and f"torch=={torch_pin.group(1)}" not in torch_run:
        problems.append(f"the Dockerfile's torch is not the Makefile's torch=={torch_pin.group(1)}")
    project = [i for i, r in enumerate(runs) if re.search(r"pip install (--no-deps )?(\.|/src)(\s|$|&)", r)]
    if not project or project[0] < torch_step:
        problems.append("the project is not pip-installed after torch")
    problems += _check_dockerfile_runtime(steps)
    return problems


def _check_dockerfile_runtime(steps: list[tuple[str, str]]) -> list[str]:
    problems = []
    users = [a for k, a in steps if k == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the container runs as root (no USER, or USER root last)")
    cmd = [a for k, a in steps if k in ("CMD", "ENTRYPOINT")]
    first = json.loads(cmd[0]) if cmd and cmd[0].startswith("[") else shlex.split(cmd[0]) if cmd else []
    if first[:2] != ["quantplan", "serve"]:
        problems.append(f"the default command does not run `quantplan serve`: {cmd}")
    copied = [arg.split()[0] for k, arg in steps if k == "COPY" and not arg.startswith("--")]
    packages = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    for top in dict.fromkeys(pattern.split(".")[0] for pattern in packages["packages"]["find"]["include"]):
        if top not in copied:
            problems.append(f"package {top} (pyproject.toml) is not copied into the image")
    problems += [f"COPY {src}: no such file in the repository" for src in copied if not (REPO / src).exists()]
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    problems += [f".dockerignore excludes {src}, which the Dockerfile copies" for src in copied if src in ignored]
    problems += [f".dockerignore does not exclude {p}" for p in (".venv", ".git") if p not in ignored]
    return problems


# -- tests ----------------------------------------------------------------------------------------------------
def test_compose_file_matches_the_settings_and_itself() -> None:
    raw = load_compose()
    assert set(raw["services"]) == SERVICES
    assert check_compose(raw) == []


def test_extra_env_names_are_read_by_the_code() -> None:
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "quantplan").rglob("*.py"))
    assert {n for n in EXTRA_ENV if n not in sources} == set()
    assert "QUANTPLAN_DATABASE_URL" in known_env_names()


def test_api_tokens_must_be_given() -> None:
    with pytest.raises(MissingVariable, match="QUANTPLAN_API_TOKENS"):
        resolve(load_compose(), {})
    api = resolve(load_compose(), SHELL_ENV)["services"]["api"]
    assert environment(api)["QUANTPLAN_API_TOKENS"] == SHELL_ENV["QUANTPLAN_API_TOKENS"]
    assert StorageSettings(api_tokens=SHELL_ENV["QUANTPLAN_API_TOKENS"]).tokens() == {"0123456789abcdef": "ci"}


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET ${UNSET}", env) == "x d  d x $SET "
    with pytest.raises(MissingVariable):
        interpolate("${EMPTY:?needed}", env)


def test_dockerfile() -> None:
    assert check_dockerfile((REPO / "Dockerfile").read_text(encoding="utf-8")) == []


def _api_env(raw: dict) -> dict:
    return raw["services"]["api"]["environment"]


def _edit_command(service: str, old: str, new: str) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        cmd = raw["services"][service]["command"]
        raw["services"][service]["command"] = [c.replace(old, new) for c in cmd]
    return edit


def _rename_env(raw: dict) -> None:
    env = _api_env(raw)
    env["QUANTPLAN_DATABASE_URI"] = env.pop("QUANTPLAN_DATABASE_URL")


MUTATIONS: dict[str, tuple[Callable[[dict], None], str]] = {
    "misspelt setting": (_rename_env, "unknown setting QUANTPLAN_DATABASE_URI"),
    "misspelt reference": (lambda r: _api_env(r).update(QUANTPLAN_AUTH_READS="${QUANTPLAN_AUTH_READ:-false}"),
                           "unknown setting QUANTPLAN_AUTH_READ"),
    "serve on another port": (_edit_command("api", "--port 8000", "--port 8001"), "serves port 8001"),
    "serve on loopback": (_edit_command("api", "--host 0.0.0.0", "--host 127.0.0.1"), "not 0.0.0.0"),
    "no serve": (_edit_command("api", "quantplan serve", "quantplan runner"), "does not run `quantplan serve`"),
    "worker joins another port": (_edit_command("ray-worker", "ray-head:6379", "ray-head:6380"),
                                  "ray-worker joins Ray at ray-head:6380"),
    "runner names another head": (lambda r: _api_env(r).update(QUANTPLAN_RAY_ADDRESS="head:6379"),
                                  "is not ray-head:6379"),
    "worker exits": (_edit_command("ray-worker", "--block", "--verbose"), "lacks --block"),
    "wrong db password": (lambda r: r["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="other"),
                          "does not match the postgres service"),
    "no pg healthcheck": (lambda r: r["services"]["postgres"].pop("healthcheck"), "no pg_isready healthcheck"),
    "api does not wait": (lambda r: r["services"]["api"].update(depends_on=["postgres", "ray-head"]),
                          "does not wait for postgres"),
    "fixed worker name": (lambda r: r["services"]["ray-worker"].update(container_name="w"), "container_name"),
    "fixed worker port": (lambda r: r["services"]["ray-worker"].update(ports=["8265:8265"]), "fixed host port"),
    "undeclared volume": (lambda r: r["volumes"].pop("models"), "'models' at /models, not declared"),
    "artifacts in the container": (lambda r: _api_env(r).update(QUANTPLAN_ARTIFACTS="/tmp/artifacts"),
                                   "QUANTPLAN_ARTIFACTS=/tmp/artifacts is not on a volume"),
    "api not a Ray node": (lambda r: r["services"]["api"].update(command="quantplan serve --host 0.0.0.0 --port 8000"),
                           "api does not join the Ray cluster"),
    "object store over shm": (lambda r: r["services"]["ray-worker"].update(shm_size="1gb"),
                              "ray-worker: the object store (3000000000) must fit"),
    "service missing": (lambda r: r["services"].pop("ray-worker"), "missing services ['ray-worker']"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_compose_checks_catch(mutation: str) -> None:
    edit, message = MUTATIONS[mutation]
    raw = copy.deepcopy(load_compose())
    edit(raw)
    problems = check_compose(raw)
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize(("old", "new", "message"), [
    ("https://download.pytorch.org/whl/cpu", "https://download.pytorch.org/whl/cu128", "CPU wheel index"),
    ('"torch==${TORCH_VERSION}"', "torch", "installs a pinned torch"),
    ('CMD ["quantplan", "serve"', 'CMD ["uvicorn", "quantplan.service.api:app"', "does not run `quantplan serve`"),
    ("USER quantplan", "USER root", "runs as root"),
    ("QUANTPLAN_CACHE_DIR=/data/cache", "QUANTPLAN_CACHE=/data/cache", "unknown setting QUANTPLAN_CACHE "),
    ("COPY quantplan ./quantplan\n", "", "package quantplan"),
])
def test_dockerfile_checks_catch(old: str, new: str, message: str) -> None:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert old in text
    problems = check_dockerfile(text.replace(old, new))
    assert any(message in p for p in problems), problems
