#!/usr/bin/env bash
# Validate deploy/k8s/*.yaml offline against the Kubernetes OpenAPI schemas shipped in the
# kubernetes-validate wheel (the [test] extra), strictly (unknown fields are errors), for
# the oldest and the newest Kubernetes we support. A kind without a schema (a typo in
# `kind` or `apiVersion`) only warns in kubernetes-validate, so any warning fails here.
# kustomization.yaml is kustomize's own file, not a resource; tests/unit/deploy checks it.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSIONS=(1.30.0 1.37.0)
KV=${KUBERNETES_VALIDATE:-}
if [ -z "$KV" ]; then
    if [ -x .venv/bin/kubernetes-validate ]; then
        KV=.venv/bin/kubernetes-validate
    elif command -v kubernetes-validate >/dev/null 2>&1; then
        KV=kubernetes-validate
    else
        echo "check_k8s: kubernetes-validate is not installed (pip install -e '.[test]')" >&2
        exit 1
    fi
fi
files=()
for f in deploy/k8s/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || files+=("$f")
done
args=(--strict --quiet)
for v in "${VERSIONS[@]}"; do args+=(-k "$v"); done
set +e
# shellcheck disable=SC2086  # KV may be "python -m kubernetes_validate"
out=$($KV "${args[@]}" "${files[@]}" 2>&1)
rc=$?
set -e
[ -z "$out" ] || echo "$out"
if [ "$rc" -ne 0 ] || grep -q '^WARN' <<<"$out"; then
    echo "check_k8s: deploy/k8s does not validate" >&2
    exit 1
fi
echo "check_k8s: ${#files[@]} manifests valid for Kubernetes ${VERSIONS[*]}"
