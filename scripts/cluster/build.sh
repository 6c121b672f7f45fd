#!/usr/bin/env bash
# Builds (once) the binaries of the test control plane from Go modules and caches them, keyed by version, under
# ${DIFFDISAGG_K8S_CACHE:-~/.cache/diffdisagg/k8s}/<k8s-version>/bin:
#   kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes via a wrapper module that replaces
#   every staging module with its published v0.<minor> version), etcd (the version k8s pins), kwok, helm,
# plus kwok-stages.yaml assembled from kwok's own stage files in the module cache.
# A stamp file records what was built; when it matches, the script only verifies and exits (well under a second).
# helm has a second stamp of its own (stamp.helm): a change to how helm alone is built rebuilds helm alone.
# Prints the cache directory as its last line (stdout); progress and timings go to stderr.
set -euo pipefail

K8S_VERSION=${DIFFDISAGG_K8S_VERSION:-1.36.3}
KWOK_VERSION=${DIFFDISAGG_KWOK_VERSION:-v0.8.0}
HELM_VERSION=${DIFFDISAGG_HELM_VERSION:-v3.22.0}
CACHE_ROOT=${DIFFDISAGG_K8S_CACHE:-$HOME/.cache/diffdisagg/k8s}
W=$CACHE_ROOT/$K8S_VERSION
BIN=$W/bin
STAMP=$W/stamp
WANT_STAMP="k8s=v$K8S_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION stages=1"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm)
HELM_STAMP=$W/stamp.helm
# kube-default: the Kubernetes version `helm template`/`helm lint` assume is stamped from helm's client-go
HELM_WANT_STAMP="helm=$HELM_VERSION kube-default=client-go"

log() { printf '[build.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

base_cached() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] || return 1
  for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
  [ -s "$W/kwok-stages.yaml" ]
}
helm_cached() { [ -f "$HELM_STAMP" ] && [ "$(cat "$HELM_STAMP")" = "$HELM_WANT_STAMP" ] && [ -x "$BIN/helm" ]; }
cached() { base_cached && helm_cached; }

if cached; then
  log "cached: $WANT_STAMP, $HELM_WANT_STAMP in $W"
  echo "$W"
  exit 0
fi

command -v go >/dev/null || { log "no Go toolchain on PATH: cannot build the control plane"; exit 3; }

mkdir -p "$BIN"
# One build at a time per cache directory: a second caller waits for the first (flock), then finds the stamp.
exec 9>"$W/.build.lock"
if ! flock -n 9; then
  log "another build holds $W/.build.lock; waiting for it"
  flock 9
  if cached; then log "built by the other process"; echo "$W"; exit 0; fi
fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
MINOR=${K8S_VERSION#1.}          # 36.3
MINOR_NUM=${MINOR%%.*}           # 36
T0=$(date +%s)
t_last=$T0
lap() { local now; now=$(date +%s); log "$1: $((now - t_last)) s"; t_last=$now; }

# helm as upstream's Makefile builds a release: besides its version, the Kubernetes version that `helm template`
# and `helm lint` assume without --kube-version (or a cluster) is stamped into pkg/chartutil and pkg/lint/rules
# from the k8s.io/client-go helm is built with (v0.37 -> 1.37 for v3.22.0). Unstamped it is v1.20, which the
# chart's `kubeVersion: ">=1.30.0-0"` refuses. Installed by a rename, so a helm that is running (another test
# using the cache) keeps its old file.
build_helm() {
  local gomod cg minor ld tmp got p
  gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  cg=$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod")
  minor=${cg#v0.}
  minor=${minor%%.*}
  [[ $cg == v0.* && $minor =~ ^[0-9]+$ ]] || { log "no k8s.io/client-go v0.<minor> in $gomod (got '$cg')"; exit 1; }
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld="$ld -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
  done
  tmp=$(mktemp -d "$W/.helm.XXXXXX")
  (cd "$W" && GOBIN=$tmp go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
  # the stamp took: a one-template chart prints the Kubernetes version helm assumes
  mkdir -p "$tmp/probe/templates"
  printf 'apiVersion: v2\nname: probe\nversion: 0.1.0\n' > "$tmp/probe/Chart.yaml"
  printf 'kube: {{ .Capabilities.KubeVersion.Version }}\n' > "$tmp/probe/templates/probe.yaml"
  got=$("$tmp/helm" template "$tmp/probe" | sed -n 's/^kube: //p')
  if [ "$got" != "v1.$minor.0" ]; then
    log "helm $HELM_VERSION assumes Kubernetes '$got', expected v1.$minor.0"
    rm -rf "$tmp"
    exit 1
  fi
  mv -f "$tmp/helm" "$BIN/helm"
  rm -rf "$tmp"
  echo "$HELM_WANT_STAMP" > "$HELM_STAMP"
}

if base_cached; then  # only helm's build changed: rebuild it alone (seconds with a warm Go build cache)
  build_helm
  lap "helm $HELM_VERSION (alone: $HELM_WANT_STAMP)"
  echo "$W"
  exit 0
fi

WRAP=$W/wrapper
mkdir -p "$WRAP"
cd "$WRAP"
if [ ! -f go.mod ] || ! grep -q "k8s.io/kubernetes v$K8S_VERSION" go.mod; then
  rm -f go.mod go.sum
  printf 'module local.invalid/k8sbins\n\ngo 1.24.0\n' > go.mod
  GOMOD=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # Every staging module upstream replaces with ./staging/... becomes its published v0.<minor> version.
  go mod edit -json "$GOMOD" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith("./staging/"):
        print(r["Old"]["Path"])' > staging.txt
  args=()
  while read -r m; do args+=("-replace=$m=$m@v0.$MINOR"); done < staging.txt
  go mod edit "${args[@]}"
  grep '^godebug' "$GOMOD" >> go.mod || true
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" \
               "k8s.io/kubernetes/cmd/kube-controller-manager@v$K8S_VERSION" \
               "k8s.io/kubernetes/cmd/kube-scheduler@v$K8S_VERSION"
  ETCD_VERSION=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
fi
ETCD_VERSION=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
lap "resolve wrapper (k8s v$K8S_VERSION, etcd $ETCD_VERSION)"

# Version stamping as upstream's hack/lib/version.sh does, so /version and --version report v$K8S_VERSION.
NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LD="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LD="$LD -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$MINOR_NUM"
  LD="$LD -X $p.gitTreeState=clean -X $p.buildDate=$NOW"
done
go build -trimpath -ldflags "$LD" -o "$BIN/" k8s.io/kubernetes/cmd/kube-apiserver
lap "kube-apiserver"
go build -trimpath -ldflags "$LD" -o "$BIN/" k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler
lap "kube-controller-manager + kube-scheduler"
go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
lap "etcd $ETCD_VERSION"

cd "$W"
GOBIN=$BIN go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
lap "kwok $KWOK_VERSION"
build_helm
lap "helm $HELM_VERSION"

# kwok's default stages (what kwokctl combines), taken from the module that was just built.
S=$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage
{
  for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    cat "$S/$f"; echo '---'
  done
} > "$W/kwok-stages.yaml.tmp"
mv "$W/kwok-stages.yaml.tmp" "$W/kwok-stages.yaml"

got=$("$BIN/kube-apiserver" --version)
[ "$got" = "Kubernetes v$K8S_VERSION" ] || { log "kube-apiserver --version says '$got', expected v$K8S_VERSION"; exit 1; }
echo "$WANT_STAMP" > "$STAMP"
log "built $WANT_STAMP in $(( $(date +%s) - T0 )) s total ($(du -sh "$BIN" | cut -f1) of binaries in $BIN)"
echo "$W"
