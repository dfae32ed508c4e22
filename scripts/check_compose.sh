#!/usr/bin/env bash
# Validate docker-compose.yml without a Docker engine: `docker-compose config -q`.
# Skips (exit 0, saying why) when docker-compose is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker-compose >/dev/null 2>&1; then
    echo "check_compose: skipped: docker-compose is not installed (Debian: apt-get install docker-compose)"
    exit 0
fi
# Placeholders for the secrets the file requires, so the check needs no real ones.
export LORAFOLD_API_KEYS="${LORAFOLD_API_KEYS:-{\"compose-check-key-0123456789abcdef\": \"check\"}}"
export LORAFOLD_S3_SECRET_KEY="${LORAFOLD_S3_SECRET_KEY:-compose-check-secret}"
docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml --profile dashboard config --services | grep -qx rq-dashboard
echo "check_compose: docker-compose.yml is valid"
