# Kasparro's routine tasks. `just` alone lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]
export CONTAINERS_CONF := justfile_directory() / ".ci/containers.conf"
export DISABLE_HC_SYSTEMD := "true"

py := justfile_directory() / ".venv/bin/python"
image := "localhost/kasparro:latest"
port := env_var_or_default("KASPARRO_PORT", "8000")
# compose.yaml's stack, as project "kasparro" whatever the folder is called
compose := "podman-compose -p kasparro"
# curl that waits for the service to answer (refused or 503 while it starts), up to a minute
curl := "curl -sS --retry 60 --retry-delay 1 --retry-max-time 60 --retry-connrefused"

# list the recipes
default:
    @{{just_executable()}} --justfile {{quote(justfile())}} --list --unsorted

# make .venv with the runtime and test dependencies, and Litestream for the replica tests
install:
    python3 -m venv .venv && .venv/bin/pip install -q -r requirements-dev.txt && .venv/bin/pip install -q -r requirements-replica.txt

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

# GET /runs, /runs/{run_id} and /runs/compare over the same store as bench-stats
bench-runs *args:
    {{py}} bench/runs_bench.py {{args}}

# the store a year of 10-minute runs over 15,000 listings leaves with the default retention (<= 2 GB), and one more run on it vs on a day's store (<= 1.2x); then history and /data?as_of= under wrk, uncached and cached
bench-history *args:
    {{py}} bench/history.py {{args}}

# the API's req/s ratios to the bare ASGI ceiling (and its p99s) in alternating wrk slices (ceiling, API, API, ceiling): figures minutes of drift do not move
bench-paired *args:
    {{py}} bench/paired.py {{args}}

# the API's ratios to the bare ASGI ceiling in server instructions per response under wrk (valgrind): figures other work on the machine does not move
bench-instructions *args:
    {{py}} bench/instructions.py {{args}}

# instructions per request of kasparro.py alone (ASGI calls in one process, no server; valgrind), e.g. --path /health --path '/data/{ids}': to compare two versions
bench-app-instructions *args:
    {{py}} bench/app_instructions.py {{args}}

# instructions of a run's retention step (prune_history) at 15,000 listings with 24 h and 96 h of history, this tree's against a commit's (--before REV, default HEAD)
bench-retention *args:
    {{py}} bench/retention_step.py {{args}}

# CPU and instructions of an uncached history read (read_history and encoding) in process, on the store bench-history left
bench-history-reads *args:
    {{py}} bench/history_reads.py {{args}}

# /data?as_of= at 15,000 listings in minutes: a store of a year's shape (identity through the Loader, history by SQL), the CPU of a moment's build in each tier, then (--api) wrk on one worker
bench-as-of *args:
    {{py}} bench/as_of.py {{args}}

# CPU microseconds of the API's per-request log line, in process, written to a pipe (and its instructions, with valgrind)
bench-log *args:
    {{py}} bench/log_cost.py {{args}}

# /data/{asset_id} on ids of all 1,000,000 assets: the API beside bare apps that only read (the bounds)
bench-detail *args:
    {{py}} bench/detail_bounds.py {{args}}

# CPU and instructions per GET /data/{asset_id} answered in process (a miss, a kept answer, the Zipf stream) on the store of `just bench`
bench-detail-cost *args:
    {{py}} bench/detail_cost.py {{args}}

# how many of the Zipf lookups miss the answer cache (kasparro.AnswerCache replayed over the bench's draws), beside the fewest a cache of its size could miss without knowing the next draws
bench-answer-misses *args:
    {{py}} bench/answer_misses.py {{args}}

# fuzz the running service ($KASPARRO_PORT) against its OpenAPI document, as tests/test_contract.py does (its .schemathesis/ cache goes in a temporary folder)
schemathesis:
    cd "$(mktemp -d)" && trap 'rm -rf "$PWD"' EXIT && {{py}} -m schemathesis.cli run http://127.0.0.1:{{port}}/openapi.json --checks all --exclude-checks positive_data_acceptance --max-examples 150

# soak: wrk on /data while three ETL runs commit, then 20 ETL kills watched by the live API
soak *args:
    {{py}} bench/soak.py {{args}}

# fetch ReDoc's standalone build again from npm at vendor/redoc/VERSION, check it against vendor/redoc/SHA256SUMS, then copy it in
vendor-redoc:
    tmp="$(mktemp -d)" && trap 'rm -rf "$tmp"' EXIT && cd "$tmp" && npm pack --silent "redoc@$(cat "{{justfile_directory()}}/vendor/redoc/VERSION")" >/dev/null && tar xzf redoc-*.tgz && cd package && sha256sum --strict -c "{{justfile_directory()}}/vendor/redoc/SHA256SUMS" && cp --parents LICENSE bundles/redoc.standalone.js bundles/redoc.standalone.js.LICENSE.txt "{{justfile_directory()}}/vendor/redoc/"

# read replicas: primary, SFTP store, two Litestream followers and haproxy in network namespaces (root); lag (idle, and under uncached reads), load, recovery
replicas *args:
    {{py}} bench/replicas.py {{args}}

# how long a Litestream follower's apply waits for its lock while 1, 2, 4 threads of one process read the copy, and their read rate, as reads begin freely, one at a time, or after a pending apply
bench-apply-wait *args:
    {{py}} bench/apply_wait.py {{args}}

# audit the pinned runtime requirements for known vulnerabilities (needs PyPI's vulnerability data; fails when it could not check every package)
audit:
    bash .ci/audit

# build the image on a locally made base
container-build:
    bash .ci/container-test --build-only

# run the image in the foreground, store on the kasparro-data volume
container-run: container-build
    podman run --rm -it --init --read-only --tmpfs /tmp -v kasparro-data:/data -p 127.0.0.1:{{port}}:8000 {{image}}

# build, run and check the image as CI does
container-test:
    bash .ci/container-test

# bring compose.yaml up as its own project, check it and take it down, as CI does
compose-test:
    bash .ci/compose-test

# start compose.yaml in the background: the API on 127.0.0.1:$KASPARRO_PORT and the ETL every $KASPARRO_ETL_EVERY s (default 600), store on the kasparro-data volume
up: container-build
    {{compose}} up -d

# stop and remove the stack's containers and network (the store volume stays)
down:
    bash .ci/stack-down

# restart the API and the ETL
restart:
    {{compose}} restart

# follow the logs of the API and the ETL
logs:
    {{compose}} logs -f -n --tail 100

# show the stack's containers
ps:
    {{compose}} ps

# open a shell in the API's container
shell:
    {{compose}} exec api sh

# ask the running service for its health, waiting up to a minute for it to answer
health:
    {{curl}} http://127.0.0.1:{{port}}/health; echo

# ask the running service for a page of data: `just data 'page_size=2&sort=-rank'` or `just data page_size=2 sort=-rank`
data *query:
    {{curl}} {{quote("http://127.0.0.1:" + port + "/data?" + replace(query, " ", "&"))}}; echo

# remove what the recipes made: the stack with its store volume, local stores, caches, bench output and the venv; `just clean images` removes the images too
clean *what:
    bash .ci/stack-down --volumes {{ if what == "images" { "--images" } else { "" } }} && rm -rf .venv .pytest_cache .ruff_cache .hypothesis .schemathesis kasparro.db kasparro.db-* kasparro.db.etl-lock bench/out
