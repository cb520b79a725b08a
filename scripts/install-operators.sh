#!/usr/bin/env bash
# Installs the operators the manifests need, at the versions whose CRD schemas the
# validation uses (tools/manifests/schemas; a test compares the versions): cert-manager,
# KubeRay, Kubeflow Trainer (with the torch-distributed ClusterTrainingRuntime) and KServe
# in Standard mode (no Knative, no Istio). Needs kubectl and helm >= 3.8 pointing at a Kubernetes >= 1.32 cluster.
# Re-runnable (helm upgrade --install). Override a version with e.g. KSERVE_VERSION=v0.21.0.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.17.0}"
KUBERAY_VERSION="${KUBERAY_VERSION:-1.7.0}"
TRAINER_VERSION="${TRAINER_VERSION:-2.3.0}"
KSERVE_VERSION="${KSERVE_VERSION:-v0.20.0}"
MIN_KUBERNETES_MINOR=32

run() {
  echo "+ $*"
  if [[ "${DRY_RUN:-0}" != "1" ]]; then "$@"; fi
}

if [[ "${DRY_RUN:-0}" != "1" ]]; then
  for tool in kubectl helm; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found on PATH" >&2; exit 1; }
  done
  minor="$(kubectl version -o json | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | tail -n 1)"
  if [[ -z "$minor" || "$minor" -lt "$MIN_KUBERNETES_MINOR" ]]; then
    echo "error: the cluster runs Kubernetes 1.${minor:-?}; KServe needs >= 1.${MIN_KUBERNETES_MINOR}" >&2
    exit 1
  fi
fi

echo "== cert-manager ${CERT_MANAGER_VERSION} (webhook certificates for KServe)"
run helm repo add jetstack https://charts.jetstack.io --force-update
run helm upgrade --install cert-manager jetstack/cert-manager \
  --namespace cert-manager --create-namespace --version "${CERT_MANAGER_VERSION}" \
  --set crds.enabled=true --wait

echo "== KubeRay operator ${KUBERAY_VERSION} (RayCluster feast-ray)"
run helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
run helm upgrade --install kuberay-operator kuberay/kuberay-operator \
  --namespace kuberay-system --create-namespace --version "${KUBERAY_VERSION}" --wait

echo "== Kubeflow Trainer ${TRAINER_VERSION} with JobSet and the torch-distributed runtime"
run helm upgrade --install kubeflow-trainer oci://ghcr.io/kubeflow/charts/kubeflow-trainer \
  --namespace kubeflow-system --create-namespace --version "${TRAINER_VERSION}" \
  --set runtimes.torchDistributed.enabled=true --wait

echo "== KServe ${KSERVE_VERSION} in Standard mode (plain Deployments and Services)"
run helm upgrade --install kserve-crd oci://ghcr.io/kserve/charts/kserve-crd \
  --namespace kserve --create-namespace --version "${KSERVE_VERSION}" --wait
run helm upgrade --install kserve-resources oci://ghcr.io/kserve/charts/kserve-resources \
  --namespace kserve --version "${KSERVE_VERSION}" \
  --set kserve.controller.deploymentMode=Standard \
  --set kserve.controller.gateway.disableIngressCreation=true --wait

echo "== Check"
run kubectl get crd rayclusters.ray.io trainjobs.trainer.kubeflow.org inferenceservices.serving.kserve.io
run kubectl get clustertrainingruntime torch-distributed
echo "Operators ready. Next: docker build -t sales-forecast:0.1.0 . && kubectl apply -k manifests/"
