#!/usr/bin/env bash
# End to end on Kubernetes: a kind cluster, the images built and loaded, the chart installed, a GuardProxy
# in front of an in-cluster fake Ollama, allowed and blocked requests through its Service, `helm test`.
#
#   e2e/run_kind.sh               create (or reuse) the kind cluster ollama-guard-e2e and run everything
#   e2e/run_kind.sh --existing    use the cluster KUBECONFIG names; images must be pullable there
#                                 (E2E_IMAGE_REGISTRY, E2E_IMAGE_TAG), or loaded by you
#   e2e/run_kind.sh --delete      delete the kind cluster
#   E2E_ADAPTER=1 e2e/run_kind.sh also installs prometheus-adapter with our rules (needs the
#                                 prometheus-community helm repo) and checks the custom metric API
#
# Without a container engine it prints SKIP and exits 0: kind and docker build need one.
# The checks themselves are e2e/test_chart_cluster.py (pytest -m cluster), which also runs alone against
# any KUBECONFIG (control-plane checks only, unless E2E_DATA_PLANE=1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${E2E_CLUSTER:-ollama-guard-e2e}"
export E2E_IMAGE_TAG="${E2E_IMAGE_TAG:-e2e}"
export E2E_IMAGE_REGISTRY="${E2E_IMAGE_REGISTRY:-ghcr.io/ollama-guard}"
export E2E_NAMESPACE="${E2E_NAMESPACE:-ollama-guard-e2e}"
export E2E_DATA_PLANE=1
export PATH="${ROOT}/.tools/bin:${PATH}"
PYTHON="${PYTHON:-${ROOT}/.venv/bin/python}"
PROXY_IMAGE="${E2E_IMAGE_REGISTRY}/ollama-guard:${E2E_IMAGE_TAG}"
OPERATOR_IMAGE="${E2E_IMAGE_REGISTRY}/ollama-guard-operator:${E2E_IMAGE_TAG}"

skip() { echo "SKIP: $*"; exit 0; }
say() { echo "==> $*"; }

mode="kind"
case "${1:-}" in
  --existing) mode="existing" ;;
  --delete) kind delete cluster --name "${CLUSTER}"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--existing|--delete]" >&2; exit 2 ;;
esac

command -v kubectl >/dev/null || skip "kubectl not found (python scripts/fetch_tools.py)"
command -v helm >/dev/null || skip "helm not found (python scripts/fetch_tools.py)"

if [[ "${mode}" == "kind" ]]; then
  command -v docker >/dev/null || skip "no container engine (docker) on this machine"
  docker info >/dev/null 2>&1 || skip "docker has no daemon to talk to: kind and docker build need one"
  command -v kind >/dev/null || skip "kind not found (go install sigs.k8s.io/kind@latest, or your package manager)"

  if ! kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
    say "creating kind cluster ${CLUSTER}"
    kind create cluster --name "${CLUSTER}" --config "${ROOT}/e2e/kind/kind-config.yaml" --wait 120s
  fi
  kubectl config use-context "kind-${CLUSTER}"

  say "building ${PROXY_IMAGE} and ${OPERATOR_IMAGE}"
  docker build --target proxy -t "${PROXY_IMAGE}" "${ROOT}"
  docker build --target operator -t "${OPERATOR_IMAGE}" "${ROOT}"
  say "loading the images into kind"
  kind load docker-image --name "${CLUSTER}" "${PROXY_IMAGE}" "${OPERATOR_IMAGE}"
else
  kubectl get --raw /readyz --request-timeout=5s >/dev/null || { echo "the cluster in KUBECONFIG does not answer" >&2; exit 1; }
fi

if [[ "${E2E_ADAPTER:-0}" == "1" ]]; then
  say "installing prometheus-adapter with deploy/prometheus/adapter-values.yaml"
  helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null
  helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter -n monitoring \
    --create-namespace -f "${ROOT}/deploy/prometheus/adapter-values.yaml" --wait
  kubectl get --raw /apis/custom.metrics.k8s.io/v1beta1 >/dev/null
fi

say "running e2e/test_chart_cluster.py"
cd "${ROOT}"
status=0
"${PYTHON}" -m pytest e2e/test_chart_cluster.py -m cluster -v -p no:cacheprovider || status=$?

if [[ "${E2E_ADAPTER:-0}" == "1" ]]; then
  kubectl get --raw "/apis/custom.metrics.k8s.io/v1beta1/namespaces/${E2E_NAMESPACE}/pods/*/ollama_guard_requests_per_second" \
    || status=1
fi
exit "${status}"
