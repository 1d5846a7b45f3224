#!/usr/bin/env bash
# The GPU benchmark in one command (bench/gpu_bench.py says what it measures): writes
# bench/out/gpu.json and bench/out/gpu.md. At most ~8 minutes on one GPU.
#
#   bench/gpu.sh                     # on a GPU machine
#   bench/gpu.sh --cpu-smoke         # every part at tiny sizes on this CPU (< 3 minutes)
#   bench/gpu.sh --fetch-wheels      # here, with PyPI: the wheels a bare GPU image lacks -> bench/out/wheels
#   bench/gpu.sh --out DIR --parts maco,nmf
#
# Python: the project's .venv when there is one, else python3 (a GPU image's, which holds torch).
# What that python lacks (Prefect, Dask, Zarr, pydantic...; Horama for the comparison) comes from the
# wheels in bench/out/wheels (or $LENS_WHEELS): installed with --no-index into /tmp/lens-site, so a
# machine without internet needs nothing else. dask-cuda is not among them: without it
# flows.cluster.local_cluster(gpu=True) starts one plain, pinned Dask worker per GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${LENS_WHEELS:-bench/out/wheels}"

# Packages of the project's dependency closure that the GPU image (see the device notes) lacks,
# at the venv's versions; without S3 (botocore, aiobotocore, s3fs, jmespath) and Postgres (asyncpg):
# the benchmark's store is a local folder. Horama 0.3.0 + einops: the bench-only comparison.
GPU_IMAGE_LACKS="aiosqlite==0.22.1 alembic==1.20.1 amplitude-analytics==1.3.0 annotated-types==0.8.0
apprise==1.13.1 asgi-lifespan==2.1.0 beartype==0.23.1 burner-redis==0.1.7 cachetools==7.3.3 cffi==2.1.1
coolname==5.0.0 cronsim==2.8 cryptography==50.0.2 cyclopts==5.5.2 dask==2026.8.0 dateparser==1.5.0
distributed==2026.8.0 docker==7.2.0 docstring-parser==0.18.0 donfig==0.8.1.post1 exceptiongroup==1.3.2
fastapi==0.150.0 google-crc32c==1.9.0 graphviz==0.21 greenlet==3.5.6 griffe==2.4.1 griffecli==2.4.1
griffelib==2.4.1 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 importlib-metadata==10.2.0
jinja2-humanize-extension==0.4.0 jsonpatch==1.48 jsonpointer==3.12 jsonschema==4.26.0
jsonschema-specifications==2025.9.1 lazy-importer==0.1.0 locket==1.0.0 mako==1.4.3 numcodecs==0.16.6
oauthlib==4.0.1 opentelemetry-api==1.45.2 orjson==3.13.0 partd==1.4.2 pendulum==3.3.0 prefect==3.8.8
prefect-dask==0.3.7 py-key-value-aio==0.5.0 pycparser==3.12 pydantic==2.14.4 pydantic-core==2.50.5
pydantic-extra-types==2.11.1 pydantic-settings==2.16.3 pydocket==0.27.0 python-dotenv==1.2.4
python-json-logger==4.2.0 python-slugify==9.0.0 pytz==2026.6 readchar==4.2.2 redis==8.1.0
referencing==0.37.0 requests-oauthlib==2.0.0 rfc3339-validator==0.1.4 rich-rst==2.2.0 rpds-py==2026.9.1
ruamel-yaml==0.19.1 ruamel-yaml-clib==0.2.15 semver==3.1.2 sniffio==1.3.1 sqlalchemy==2.1.9
starlette==1.10.0 tblib==3.2.2 text-unidecode==1.3 toml==0.10.2 tornado==6.6.1 typing-inspection==0.4.5
tzdata==2026.6 tzlocal==5.4.5 uncalled-for==0.6.2 uvicorn==0.54.0 websockets==16.1.1 zarr==3.1.6
zict==3.0.0 horama==0.3.0 einops==0.8.2"

if [ "${1:-}" = "--fetch-wheels" ]; then
    # cp312 manylinux wheels (the GPU image's Python is 3.12), no dependencies resolved: the list is whole.
    mkdir -p "$WHEELS"
    PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
    platforms=""
    for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
        platforms="$platforms --platform ${p}_x86_64"
    done
    # shellcheck disable=SC2086
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $platforms -d "$WHEELS" $GPU_IMAGE_LACKS
    echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS (carry it to the GPU machine)"
    exit 0
fi

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import prefect, prefect_dask, zarr, pydantic" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=/tmp/lens-site
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
    export PATH="$SITE/bin:$PATH"
fi
# Horama: the bench-only extra of scripts/bench.sh, or the wheels' site above
if [ -d .bench-extras/horama ]; then export HORAMA_PATH="$PWD/.bench-extras"; fi
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec "$PY" bench/gpu_bench.py "$@"
