#!/usr/bin/env bash
# make helm-lint: static checks of the Helm chart and the Dockerfile (no cluster, no network after tool install).
#
#   scripts/helm_lint.sh                    run all checks
#   scripts/helm_lint.sh --sync-dashboard   copy deploy/grafana/asyndgan.json (canonical) into the chart, then exit
#
# 1. the chart's copy of the Grafana dashboard equals deploy/grafana/asyndgan.json (Helm cannot read outside the chart)
# 2. hadolint on deploy/docker/Dockerfile
# 3. helm lint --strict with each deploy/k8s/examples/*.yaml (values.schema.json applies), plus dial-out variants
#    of hospital-c (metrics off; generator by IP without DNS)
# 4. helm template per example -> kubernetes-validate --strict against the oldest supported and the newest schemas
# 5. cross-reference checks on the rendered manifests (a dial-out release: no gRPC port or Service, NetworkPolicy
#    with metrics-only ingress and egress to the generator + DNS only; the `helm test` Pods; the PrometheusRule's
#    selectors scoped to the release), the container args parsed by the real asyndgan CLI, and `promtool check
#    rules` on the rendered PrometheusRule (when promtool is on PATH; tests/integration/test_metrics.py always
#    checks and unit-tests the canonical rules file)
# 6. values that must be refused are refused; helm package works
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
CHART=deploy/k8s/asyndgan
CANONICAL=deploy/grafana/asyndgan.json
COPY=$CHART/dashboards/asyndgan.json
PY=${PY:-.venv/bin/python}
# Oldest Kubernetes the chart supports (native grpc probes are GA in 1.27) and the newest schemas bundled.
KUBE_VERSIONS=${KUBE_VERSIONS:-1.27.0 1.37.0}
# CRDs without a bundled schema: checked by check_rendered.py instead.
CRD_KINDS='ServiceMonitor|PrometheusRule'
log() { echo "[helm-lint +$(($(date +%s) - T0))s] $*"; }
die() { echo "[helm-lint] FAIL: $*" >&2; exit 1; }

if [[ ${1:-} == --sync-dashboard ]]; then
    cp "$CANONICAL" "$COPY"
    echo "copied $CANONICAL -> $COPY"
    exit 0
fi

scripts/install_tools.sh helm kubernetes-validate hadolint
HELM=.tools/bin/helm KV=.tools/bin/kubernetes-validate TOOLS_PY=.tools/venv/bin/python
OUT=$(mktemp -d "${TMPDIR:-/tmp}/asyndgan-helm.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

# 1
[[ -f $CANONICAL ]] || die "$CANONICAL is missing"
cmp -s "$CANONICAL" "$COPY" || die "$COPY differs from $CANONICAL: run scripts/helm_lint.sh --sync-dashboard"
log "dashboard copy in the chart matches $CANONICAL"

# 2
.tools/bin/hadolint deploy/docker/Dockerfile
log "hadolint: deploy/docker/Dockerfile clean"

# 3 + 4
examples=(deploy/k8s/examples/*.yaml)
for ex in "${examples[@]}"; do
    name=$(basename "$ex" .yaml)
    "$HELM" lint --strict --quiet "$CHART" -f "$ex" >"$OUT/lint-$name.txt" 2>&1 || { cat "$OUT/lint-$name.txt" >&2; die "helm lint $ex"; }
    "$HELM" template "$name" "$CHART" -f "$ex" --namespace "asyndgan-$name" >"$OUT/$name.yaml"
done
# Dial-out variants (hospital-c.yaml is the dial-out example): without metrics (no Service, no probes, no ingress
# at all), and with the generator given by IP address (no DNS egress).
hc=deploy/k8s/examples/hospital-c.yaml
variants=(
    "dialout-nometrics --set metrics.enabled=false"
    "dialout-ip-nodns --set discriminator.generatorAddress=203.0.113.20:443 --set discriminator.networkPolicy.dnsTo=null"
)
for v in "${variants[@]}"; do
    read -r name args <<<"$v"
    # shellcheck disable=SC2086
    "$HELM" lint --strict --quiet "$CHART" -f "$hc" $args >"$OUT/lint-$name.txt" 2>&1 || { cat "$OUT/lint-$name.txt" >&2; die "helm lint $name"; }
    # shellcheck disable=SC2086
    "$HELM" template "$name" "$CHART" -f "$hc" $args --namespace "asyndgan-$name" >"$OUT/$name.yaml"
done
grep -q 'kind: Service$' "$OUT/dialout-nometrics.yaml" && die "dialout-nometrics renders a Service"
grep -q 'port: 53$' "$OUT/dialout-ip-nodns.yaml" && die "dialout-ip-nodns allows DNS egress"
grep -q 'helm.sh/hook: test' "$OUT/dialout-nometrics.yaml" && die "dialout-nometrics renders a helm test Pod"
# A generator for sites across a WAN: 8-bit gradients, the pipelined step, a weight average and site styles (its
# args go through the CLI below).
wan=(-f deploy/k8s/examples/generator.yaml --set generator.gradCodec=q8+zstd --set generator.pipeline=true
    --set-json generator.ema=0.999 --set generator.siteStyles=true)
"$HELM" lint --strict --quiet "$CHART" "${wan[@]}" >"$OUT/lint-generator-wan.txt" 2>&1 || { cat "$OUT/lint-generator-wan.txt" >&2; die "helm lint generator-wan"; }
"$HELM" template generator-wan "$CHART" "${wan[@]}" --namespace asyndgan-generator-wan >"$OUT/generator-wan.yaml"
grep -q -- '- --pipeline$' "$OUT/generator-wan.yaml" || die "generator-wan renders no --pipeline"
grep -q -- '- --ema=0.999$' "$OUT/generator-wan.yaml" || die "generator-wan renders no --ema"
grep -q -- '- --site-styles$' "$OUT/generator-wan.yaml" || die "generator-wan renders no --site-styles"
log "helm lint --strict + helm template: ${#examples[@]} examples, ${#variants[@]} dial-out variants, a WAN generator"
for v in $KUBE_VERSIONS; do
    "$KV" --strict -k "$v" "$OUT"/*.yaml >"$OUT/kv-$v.txt" 2>&1 || { cat "$OUT/kv-$v.txt" >&2; die "kubernetes-validate $v"; }
    # A resource without a schema is only a warning for kubernetes-validate; here only the known CRDs may lack one.
    if grep -v 'INFO' "$OUT/kv-$v.txt" | grep -vE "Couldn't find schema for kind ($CRD_KINDS) " | grep -q .; then
        grep -v 'INFO' "$OUT/kv-$v.txt" >&2
        die "kubernetes-validate $v: unexpected warnings"
    fi
    log "kubernetes-validate --strict -k $v: $(grep -c 'passed for resource' "$OUT/kv-$v.txt") resources passed"
done

# 5
"$TOOLS_PY" deploy/k8s/check_rendered.py manifests "$OUT/args.json" "$OUT"/*.yaml
# -P: the chart folder deploy/k8s/asyndgan must not shadow the asyndgan package
"$PY" -P deploy/k8s/check_rendered.py cli-args "$OUT/args.json"
rules=("$OUT"/rules-*.yml)
[[ -e ${rules[0]} ]] || die "no example renders a PrometheusRule (alerts.enabled)"
if command -v promtool >/dev/null; then
    promtool check rules "${rules[@]}" >"$OUT/promtool.txt" 2>&1 || { cat "$OUT/promtool.txt" >&2; die "promtool check rules"; }
    log "promtool check rules: ${#rules[@]} rendered PrometheusRule(s), $(grep -c SUCCESS "$OUT/promtool.txt") passed"
else
    log "promtool not on PATH: rendered PrometheusRule not checked (Debian package prometheus)"
fi

# 6: each of these must make `helm template` fail, with a message that names the problem
refuse() {  # refuse WHY EXPECTED-MESSAGE-REGEX ARGS...
    local why=$1 expect=$2
    shift 2
    if "$HELM" template bad "$CHART" "$@" >/dev/null 2>"$OUT/refuse.txt"; then die "accepted: $why"; fi
    grep -qE "$expect" "$OUT/refuse.txt" || { cat "$OUT/refuse.txt" >&2; die "refused for another reason: $why"; }
    refused=$((refused + 1))
}
refused=0
d=(--set role=discriminator --set discriminator.siteId=h --set "discriminator.data.spec=embedded:icbm152?site=0&of=3")
"$HELM" template ok "$CHART" "${d[@]}" >/dev/null || die "minimal discriminator values refused"
refuse "no role" "/role" --set role=
refuse "discriminator without siteId" "/discriminator/siteId" \
    --set role=discriminator --set discriminator.data.spec=npz:/data/x.npz
refuse "discriminator without data" "/discriminator/data/spec" --set role=discriminator --set discriminator.siteId=h
refuse "generator without sites" "/generator/sites" --set role=generator
refuse "misspelt key" "'discriminater' not allowed" "${d[@]}" --set discriminater.siteId=h
refuse "TLS without secret" "needs tls.secretName" "${d[@]}" --set tls.enabled=true
refuse "both data sources" "existingClaim or hostPath, not both" "${d[@]}" \
    --set discriminator.data.existingClaim=p --set discriminator.data.hostPath=/x
refuse "site without port" "/generator/sites/0/address" \
    --set role=generator --set 'generator.sites[0].name=a' --set 'generator.sites[0].address=a'
refuse "bad probe mode" "/probes/mode" "${d[@]}" --set probes.mode=http
refuse "grpc probe on a TLS port" "plaintext only" "${d[@]}" --set tls.enabled=true --set tls.secretName=s \
    --set probes.mode=grpc
refuse "allow-list entry with a space" "/tls/allowedClients/0" "${d[@]}" --set 'tls.allowedClients[0]=a b'
refuse "Kubernetes older than 1.27" "kubeVersion" "${d[@]}" --kube-version 1.26.0
o=("${d[@]}" --set discriminator.mode=dial-out --set discriminator.generatorAddress=gen.example.org:50051)
"$HELM" template ok "$CHART" "${o[@]}" >/dev/null || die "minimal dial-out values refused"
refuse "unknown transport mode" "/discriminator/mode" "${d[@]}" --set discriminator.mode=dial-up
refuse "dial-out without generatorAddress" "/discriminator/generatorAddress" "${d[@]}" --set discriminator.mode=dial-out
refuse "generatorAddress without port" "/discriminator/generatorAddress" "${o[@]}" \
    --set discriminator.generatorAddress=gen.example.org
refuse "generatorAddress with mode dial-in" "mode is dial-in" "${d[@]}" \
    --set discriminator.generatorAddress=gen.example.org:50051
refuse "dial-out with a gRPC probe" "nothing listens on a gRPC port" "${o[@]}" --set probes.mode=grpc
refuse "dial-out with an exec probe" "nothing listens on a gRPC port" "${o[@]}" --set probes.mode=exec
refuse "dial-out behind a LoadBalancer" "opens no port" "${o[@]}" --set service.type=LoadBalancer
refuse "dial-out NetworkPolicy without the generator" "give egressTo and/or egressCIDRs" "${o[@]}" \
    --set discriminator.networkPolicy.egressTo=null
refuse "dial-out egress peer of unknown shape" "/discriminator/networkPolicy/egressTo/0" "${o[@]}" \
    --set 'discriminator.networkPolicy.egressTo[0].cidr=10.0.0.0/8'
refuse "minSites above the number of sites" "minSites=2 but only 1 site" --set role=generator \
    --set 'generator.sites[0].name=a' --set generator.minSites=2
refuse "two step variants" "choose one step variant" --set role=generator --set 'generator.sites[0].name=a' \
    --set generator.pipeline=true --set generator.stale=true
refuse "alerts on a discriminator" "generator's release only" "${d[@]}" --set alerts.enabled=true
refuse "alerts without metrics" "alerts.enabled needs metrics.enabled" --set role=generator \
    --set 'generator.sites[0].name=a' --set alerts.enabled=true --set metrics.enabled=false
log "$refused invalid value sets refused, each for its reason"
"$HELM" template ok "$CHART" "${d[@]}" --set helmTest.enabled=false | grep -q 'helm-test' \
    && die "helmTest.enabled=false still renders the test Pod or admits it in the NetworkPolicy"
"$HELM" package "$CHART" -d "$OUT" >/dev/null
log "helm package: $(cd "$OUT" && ls ./*.tgz | xargs -n1 basename)"
log "PASS in $(($(date +%s) - T0)) s"
