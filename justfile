# Kasparro's routine tasks. `just` alone lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]
export CONTAINERS_CONF := justfile_directory() / ".ci/containers.conf"
export DISABLE_HC_SYSTEMD := "true"

py := justfile_directory() / ".venv/bin/python"
image := "localhost/kasparro:latest"
port := env_var_or_default("KASPARRO_PORT", "8000")

# list the recipes
default:
    @just --list --unsorted

# make .venv with the runtime and test dependencies
install:
    python3 -m venv .venv && .venv/bin/pip install -q -r requirements-dev.txt

# load the sources (default: the shipped sample) into the store
etl *sources:
    {{py}} etl.py {{sources}}

# serve the API on 127.0.0.1 ($KASPARRO_PORT, default 8000)
serve:
    {{py}} -m uvicorn kasparro:app --host 127.0.0.1 --port {{port}} --timeout-graceful-shutdown 3

# serve with auto-reload while editing
dev:
    {{py}} -m uvicorn kasparro:app --host 127.0.0.1 --port {{port}} --reload

# run the test suite
test *args:
    {{py}} -m pytest {{args}}

# lint and check formatting
lint:
    {{py}} -m ruff check . && {{py}} -m ruff format --check .

# time etl.py on 1,000,000 generated rows against sqlite3 .import
bench-etl rows="1000000":
    {{py}} bench/etl_bench.py --rows {{rows}}

# load-test the API with wrk on 1,000,000 generated assets, against a bare ASGI ceiling
bench *args:
    {{py}} bench/api_bench.py {{args}}

# uncached GET /stats over a store recording a year of 10-minute runs (52,560)
bench-stats *args:
    {{py}} bench/stats_bench.py {{args}}

# CPU microseconds of the API's per-request log line, in process, written to a pipe
bench-log *args:
    {{py}} bench/log_cost.py {{args}}

# /data/{asset_id} on ids of all 1,000,000 assets: the API beside bare apps that only read (the bounds)
bench-detail *args:
    {{py}} bench/detail_bounds.py {{args}}

# fuzz the running service ($KASPARRO_PORT) against its OpenAPI document, as tests/test_contract.py does
schemathesis:
    {{py}} -m schemathesis.cli run http://127.0.0.1:{{port}}/openapi.json --checks all --exclude-checks positive_data_acceptance --max-examples 150

# soak: wrk on /data while three ETL runs commit, then 20 ETL kills watched by the live API
soak *args:
    {{py}} bench/soak.py {{args}}

# fetch ReDoc's standalone build again from npm at vendor/redoc/VERSION, check it against vendor/redoc/SHA256SUMS, then copy it in
vendor-redoc:
    tmp="$(mktemp -d)" && trap 'rm -rf "$tmp"' EXIT && cd "$tmp" && npm pack --silent "redoc@$(cat "{{justfile_directory()}}/vendor/redoc/VERSION")" >/dev/null && tar xzf redoc-*.tgz && cd package && sha256sum --strict -c "{{justfile_directory()}}/vendor/redoc/SHA256SUMS" && cp --parents LICENSE bundles/redoc.standalone.js bundles/redoc.standalone.js.LICENSE.txt "{{justfile_directory()}}/vendor/redoc/"

# audit the pinned runtime requirements for known vulnerabilities (needs PyPI's JSON API)
audit:
    {{py}} -m pip_audit --strict --no-deps --disable-pip -r requirements.txt

# build the image on a locally made base
container-build:
    bash .ci/container-test --build-only

# run the image in the foreground, store on the kasparro-data volume
container-run: container-build
    podman run --rm -it --init --read-only --tmpfs /tmp -v kasparro-data:/data -p 127.0.0.1:{{port}}:8000 {{image}}

# build, run and check the image as CI does
container-test:
    bash .ci/container-test

# start the service container in the background
up: container-build
    podman run -d --replace --init --name kasparro --read-only --tmpfs /tmp -v kasparro-data:/data -p 127.0.0.1:{{port}}:8000 {{image}}

# stop and remove the service container (the store volume stays)
down:
    podman rm -f -t 10 --ignore kasparro

# restart the service container
restart:
    podman restart -t 10 kasparro

# follow the service container's logs
logs:
    podman logs -f --tail 100 kasparro

# show the service container
ps:
    podman ps -a --filter name='^kasparro$'

# open a shell in the service container
shell:
    podman exec -it kasparro sh

# ask the running service for its health
health:
    curl -sS http://127.0.0.1:{{port}}/health; echo

# ask the running service for the first page of data
data *query:
    curl -sS "http://127.0.0.1:{{port}}/data?{{query}}"; echo

# remove local stores, caches and the venv
clean:
    rm -rf .venv .pytest_cache .ruff_cache .hypothesis kasparro.db kasparro.db-* kasparro.db.etl-lock bench/out
