"""Checks on `helm template` output that schema validation cannot make (run by scripts/helm_lint.sh).

check_rendered.py manifests OUT.json RENDERED.yaml...   (needs PyYAML: the tools venv)
    cross-references inside each release (selectors, ports, volumes, probes vs TLS, NetworkPolicy, ServiceMonitor,
    PrometheusRule, dashboard, the `helm test` Pod) and writes each Deployment's container args to OUT.json, and
    each PrometheusRule's groups to rules-RELEASE.yml beside it (for `promtool check rules`). A dial-out
    discriminator (--connect) must open no gRPC port anywhere (no --listen, no grpc containerPort, no Service port,
    no grpc probe), and its NetworkPolicy must admit no ingress but metrics and allow egress only to the
    generator's port and DNS. The releases given must include a dial-in and a dial-out discriminator, a generator
    with both kinds of site, and `helm test` Pods of both kinds (gRPC health, metrics).
check_rendered.py cli-args OUT.json                     (needs asyndgan: the project venv)
    parses those args with the real `asyndgan` argument parser, so the chart cannot drift from the CLI, under the
    environment the container gets (the image's ASYNDGAN_* ENV from deploy/docker/Dockerfile, then the pod's env):
    flags also read ASYNDGAN_<FLAG>, e.g. the image's ASYNDGAN_LISTEN would make a dial-out site listen
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TLS_DIR = "/etc/asyndgan/tls"


class Problems(list[str]):
    def check(self, ok: object, where: str, what: str) -> None:
        if not ok:
            self.append(f"{where}: {what}")


def subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return all(big.get(k) == v for k, v in small.items())


def check_dial_out_policy(
    name: str, np: dict[str, Any], generator_port: int, metrics: bool, problems: Problems
) -> None:
    """Dial-out NetworkPolicy: ingress only to the metrics port; egress only TCP to the generator's port (to named
    peers) and port 53 (DNS, to named peers)."""
    spec = np["spec"]
    problems.check(
        {"Ingress", "Egress"} <= set(spec.get("policyTypes", [])), name, "dial-out NetworkPolicy: Ingress+Egress"
    )
    for rule in spec.get("ingress", []):
        ports = rule.get("ports", [])
        problems.check(
            metrics and ports == [{"port": "metrics", "protocol": "TCP"}] and rule.get("from"),
            name,
            f"dial-out NetworkPolicy admits more than metrics scraping: {rule}",
        )
    egress = spec.get("egress", [])
    to_generator = [r for r in egress if r.get("ports") == [{"port": generator_port, "protocol": "TCP"}]]
    problems.check(len(to_generator) == 1, name, f"dial-out NetworkPolicy: one egress rule to TCP {generator_port}")
    for rule in egress:
        problems.check(rule.get("to"), name, f"dial-out egress rule without peers (= anywhere): {rule}")
        ports = rule.get("ports", [])
        problems.check(ports, name, f"dial-out egress rule without ports (= any port): {rule}")
        dns = all(p.get("port") == 53 and p.get("protocol") in ("UDP", "TCP") for p in ports)
        problems.check(rule in to_generator or dns, name, f"dial-out egress other than the generator and DNS: {rule}")


def hook(doc: dict[str, Any]) -> str:
    return str(doc["metadata"].get("annotations", {}).get("helm.sh/hook", ""))


def check_pod_security(where: str, pspec: dict[str, Any], container: dict[str, Any], problems: Problems) -> None:
    problems.check(pspec.get("securityContext", {}).get("runAsNonRoot") is True, where, "pod runAsNonRoot")
    sc = container.get("securityContext", {})
    problems.check(sc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem")
    problems.check(sc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation: false")
    problems.check("ALL" in sc.get("capabilities", {}).get("drop", []), where, "capabilities.drop ALL")


def check_test_pod(
    name: str,
    pod: dict[str, Any],
    by_kind: dict[str, list[dict[str, Any]]],
    workload: tuple[dict[str, int], list[str | None], bool, str],
    problems: Problems,
) -> str:
    """The `helm test` Pod: locked down like the workload, selected by no Service or NetworkPolicy as the workload,
    checking the release's own Service (gRPC health, with the workload's TLS files) or, for a dial-out site, its
    metrics Service; the discriminator's NetworkPolicy admits it to that port. Returns "grpc" or "metrics"."""
    ports, tls, dial_out, role = workload
    where = f"{name}/Pod/{pod['metadata']['name']}"
    spec, labels = pod["spec"], pod["metadata"]["labels"]
    (container,) = spec["containers"]
    check_pod_security(where, spec, container, problems)
    problems.check(spec.get("restartPolicy") == "Never", where, "restartPolicy: Never")
    problems.check(spec.get("automountServiceAccountToken") is False, where, "automountServiceAccountToken: false")
    for kind in ("Service", "NetworkPolicy"):
        for d in by_kind.get(kind, []):
            sel = d["spec"].get("selector") or d["spec"].get("podSelector", {}).get("matchLabels", {})
            problems.check(not subset(sel, labels), where, f"{kind} {d['metadata']['name']} selects the test Pod")
    cmd = container.get("command", [])
    services = {svc["metadata"]["name"]: svc for svc in by_kind.get("Service", [])}
    if dial_out:
        url = next((c for c in cmd if c.startswith("http://")), "")
        host, _, port = url[len("http://") :].partition("/")[0].partition(":")
        svc = services.get(host.split(".")[0], {})
        problems.check(svc and int(port) == ports.get("metrics"), where, f"test URL {url} is not the metrics Service")
        kind, port_name = "metrics", "metrics"
    else:
        address = next((c[len("--address=") :] for c in cmd if c.startswith("--address=")), "")
        host, _, port = address.rpartition(":")
        svc = services.get(host.split(".")[0], {})
        grpc_ports = [sp["port"] for sp in svc.get("spec", {}).get("ports", []) if sp["name"] == "grpc"]
        problems.check(grpc_ports == [int(port or 0)], where, f"test address {address} is not the gRPC Service")
        problems.check(f"--service=asyndgan.v1.{role.capitalize()}Service" in cmd, where, "test checks another service")
        for f, v in zip(("cert", "key", "ca"), tls, strict=True):
            problems.check((f"--tls-{f}={v}" in cmd) == bool(v), where, f"test --tls-{f} differs from the workload")
        kind, port_name = "grpc", "grpc"
    if role == "discriminator":
        for np in by_kind.get("NetworkPolicy", []):
            admits = [
                r
                for r in np["spec"].get("ingress", [])
                if {"port": port_name, "protocol": "TCP"} in r.get("ports", [])
                and any(subset(p.get("podSelector", {}).get("matchLabels", {}) or {"-": "-"}, labels)
                        for p in r.get("from", []) if "namespaceSelector" not in p)
            ]  # fmt: skip
            problems.check(admits, where, f"NetworkPolicy does not admit the test Pod to port {port_name}")
    return kind


def check_rules(name: str, rule: dict[str, Any], job: str, problems: Problems) -> None:
    """Every selector of every alert is scoped to one namespace and to the generator's job (its Service name)."""
    import re

    scopes = set()
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            where = f"{name}/PrometheusRule/{r.get('alert', r.get('record'))}"
            problems.check(r.get("labels", {}).get("severity"), where, "alert without a severity label")
            selectors = re.findall(r"\b(asyndgan_[a-z_]+)(\{[^}]*\})?", r["expr"])
            problems.check(selectors, where, "no asyndgan series")
            for metric, sel in selectors:
                m = re.match(r'\{namespace="([^"]+)", job="([^"]+)"', sel)
                problems.check(m and m.group(2) == job, where, f"{metric}{sel} is not scoped to job {job}")
                scopes.add(m.group(1) if m else "")
    problems.check(len(scopes) == 1, name, f"PrometheusRule selectors name namespaces {sorted(scopes)}")


def check_release(name: str, docs: list[dict[str, Any]], problems: Problems) -> list[dict[str, Any]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = by_kind.get("Deployment", [])
    problems.check(len(deployments) == 1, name, f"expected one Deployment, got {len(deployments)}")
    out = []
    for dep in deployments:
        where = f"{name}/Deployment/{dep['metadata']['name']}"
        spec = dep["spec"]
        pod = spec["template"]
        labels = pod["metadata"]["labels"]
        problems.check(subset(spec["selector"]["matchLabels"], labels), where, "selector does not match pod labels")
        problems.check(
            spec.get("replicas") == 1 and spec["strategy"]["type"] == "Recreate", where, "1 replica, Recreate"
        )
        pspec = pod["spec"]
        (container,) = pspec["containers"]
        role = container["name"]
        problems.check(role in ("generator", "discriminator"), where, f"container name {role!r} is not a role")
        problems.check(labels.get("app.kubernetes.io/component") == role, where, "component label != role")
        check_pod_security(where, pspec, container, problems)
        volumes = {v["name"]: v for v in pspec.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for m in mounts.values():
            problems.check(m["name"] in volumes, where, f"volumeMount {m['name']} has no volume")
        tmp = mounts.get("/tmp")
        problems.check(tmp and "emptyDir" in volumes.get(tmp["name"], {}), where, "/tmp must be an emptyDir")
        args: list[str] = container.get("args", [])
        flags = dict(a[2:].partition("=")[::2] for a in args if a.startswith("--"))
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        dial_out = "connect" in flags
        listen_port = int(flags.get("listen", ":0").rsplit(":", 1)[1])
        if dial_out:
            problems.check(role == "discriminator", where, "--connect on a generator")
            problems.check("listen" not in flags, where, "dial-out with --listen")
            problems.check("grpc" not in ports, where, "dial-out pod declares a grpc containerPort")
            problems.check("allow-client" not in flags, where, "dial-out serves nothing: --allow-client is moot")
        else:
            problems.check(ports.get("grpc") == listen_port, where, f"grpc port {ports.get('grpc')} != --listen")
        if "metrics-port" in flags:
            problems.check(ports.get("metrics") == int(flags["metrics-port"]), where, "metrics port != --metrics-port")
            problems.check(flags.get("metrics-host") not in (None, "127.0.0.1", "localhost"), where, "metrics on lo")
        ckpt = flags.get("checkpoint-dir")
        problems.check(ckpt in mounts, where, "--checkpoint-dir is not a mounted volume")
        tls = [flags.get(f"tls-{k}") for k in ("cert", "key", "ca")]
        problems.check(all(tls) or not any(tls), where, "--tls-cert/--tls-key/--tls-ca go together")
        if all(tls):
            problems.check(TLS_DIR in mounts and mounts[TLS_DIR].get("readOnly"), where, "TLS secret not mounted ro")
            problems.check(all(str(t).startswith(TLS_DIR + "/") for t in tls), where, "TLS files outside the mount")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if dial_out:
                # Nothing listens on gRPC: HTTP /metrics on the metrics port, or no probe when metrics are off.
                want = {"path": "/metrics", "port": "metrics"} if "metrics" in ports else None
                problems.check((probe or {}).get("httpGet") == want, where, f"dial-out {kind}: {probe}")
                continue
            problems.check(probe, where, f"no {kind}")
            if not probe:
                continue
            if "grpc" in probe:
                problems.check(probe["grpc"]["port"] == listen_port, where, f"{kind} grpc port != --listen")
                problems.check(not any(tls), where, f"{kind}: the kubelet's grpc probe cannot speak TLS")
            elif "exec" in probe:
                cmd = probe["exec"]["command"]
                problems.check(f"--address=127.0.0.1:{listen_port}" in cmd, where, f"{kind} exec address")
                for f, v in zip(("cert", "key", "ca"), tls, strict=True):
                    problems.check(not v or f"--tls-{f}={v}" in cmd, where, f"{kind} exec probe lacks --tls-{f}")
            else:
                problems.check("tcpSocket" in probe, where, f"{kind}: unknown action")
        if role == "generator":
            sites = [a[len("--site=") :] for a in args if a.startswith("--site=")]
            problems.check(sites, where, "generator without --site")
            kinds = {"dial-in" if "=" in v else "dial-out" for v in sites}
            min_sites = int(flags.get("min-sites", "0"))
            problems.check(0 <= min_sites <= len(sites), where, f"--min-sites={min_sites} with {len(sites)} sites")
        else:
            kinds = {"dial-out" if dial_out else "dial-in"}
        if role == "discriminator":
            data = mounts.get("/data")
            if data:
                problems.check(data.get("readOnly"), where, "data volume must be mounted read-only")
        for v in volumes.values():
            claim = v.get("persistentVolumeClaim", {}).get("claimName", "")
            if claim.endswith("-checkpoints"):
                pvcs = [p["metadata"]["name"] for p in by_kind.get("PersistentVolumeClaim", [])]
                problems.check(claim in pvcs, where, f"PVC {claim} not rendered")
        env = {e["name"]: e.get("value", "") for e in container.get("env", []) if "valueFrom" not in e}
        out.append({"release": name, "role": role, "args": args, "env": env, "kinds": sorted(kinds)})

        # Service, NetworkPolicy, ServiceMonitor, dashboard
        services = by_kind.get("Service", [])
        if dial_out:
            # No gRPC Service; a headless metrics-only Service when metrics are on, else none.
            problems.check(len(services) == (1 if "metrics" in ports else 0), name, "dial-out: metrics Service only")
            for svc in services:
                sp_names = [sp["name"] for sp in svc["spec"]["ports"]]
                problems.check(sp_names == ["metrics"], name, f"dial-out Service exposes {sp_names}")
                problems.check(svc["spec"].get("clusterIP") == "None", name, "dial-out metrics Service not headless")
                problems.check(svc["spec"].get("type", "ClusterIP") == "ClusterIP", name, "dial-out Service type")
        else:
            problems.check(len(services) == 1, name, "expected one Service")
        for svc in services:
            problems.check(subset(svc["spec"]["selector"], labels), name, "Service selector does not match the pod")
            for sp in svc["spec"]["ports"]:
                problems.check(sp["targetPort"] in ports, name, f"Service targetPort {sp['targetPort']} not a port")
        if role == "discriminator" and dial_out:
            nps = by_kind.get("NetworkPolicy", [])
            problems.check(nps, name, "discriminator without NetworkPolicy")
            generator_port = int(flags["connect"].rsplit(":", 1)[1])
            for np in nps:
                sel = np["spec"]["podSelector"].get("matchLabels", {})
                problems.check(sel and subset(sel, labels), name, "NetworkPolicy does not select the pod")
                # the examples' generator port is the one in --connect (egressPort unset)
                check_dial_out_policy(name, np, generator_port, "metrics" in ports, problems)
        elif role == "discriminator":
            nps = by_kind.get("NetworkPolicy", [])
            problems.check(nps, name, "discriminator without NetworkPolicy")
            for np in nps:
                sel = np["spec"]["podSelector"].get("matchLabels", {})
                problems.check(sel and subset(sel, labels), name, "NetworkPolicy does not select the pod")
                grpc_rules = [
                    r
                    for r in np["spec"].get("ingress", [])
                    if {"port": "grpc", "protocol": "TCP"} in r.get("ports", [])
                ]
                problems.check(len(grpc_rules) == 1 and grpc_rules[0].get("from"), name, "grpc ingress rule with peers")
        for sm in by_kind.get("ServiceMonitor", []):
            problems.check(services, name, "ServiceMonitor without a Service")
            if not services:
                continue
            problems.check(
                subset(sm["spec"]["selector"]["matchLabels"], services[0]["metadata"]["labels"]),
                name,
                "ServiceMonitor selector does not match the Service",
            )
            sport_names = {p["name"] for p in services[0]["spec"]["ports"]}
            problems.check(all(e["port"] in sport_names for e in sm["spec"]["endpoints"]), name, "ServiceMonitor port")
        test_pods = [p for p in by_kind.get("Pod", []) if hook(p) == "test"]
        problems.check(len(test_pods) <= 1, name, "more than one helm test Pod")
        for pod in test_pods:
            out[-1]["test"] = check_test_pod(name, pod, by_kind, (ports, tls, dial_out, role), problems)
        for rule in by_kind.get("PrometheusRule", []):
            problems.check(role == "generator", name, "PrometheusRule in a discriminator release")
            problems.check(services, name, "PrometheusRule without a metrics Service (job label)")
            if services:
                check_rules(name, rule, services[0]["metadata"]["name"], problems)
        for cm in by_kind.get("ConfigMap", []):
            if cm["metadata"]["name"].endswith("-dashboard"):
                problems.check(cm["metadata"]["labels"].get("grafana_dashboard") == "1", name, "dashboard label")
                try:
                    dash = json.loads(cm["data"]["asyndgan.json"])
                    problems.check(dash.get("uid") and dash.get("panels"), name, "dashboard JSON without uid/panels")
                except (KeyError, ValueError) as e:
                    problems.append(f"{name}: dashboard JSON: {e}")
    return out


def cmd_manifests(out_path: str, files: list[str]) -> int:
    import yaml

    problems = Problems()
    results = []
    for f in files:
        docs = [d for d in yaml.safe_load_all(Path(f).read_text()) if d]
        results += check_release(Path(f).stem, docs, problems)
        for rule in (d for d in docs if d["kind"] == "PrometheusRule"):
            dump = Path(out_path).with_name(f"rules-{Path(f).stem}.yml")
            dump.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    # Coverage: the checks above only mean something if both transport modes were rendered.
    seen = {(r["role"], k) for r in results for k in r["kinds"]}
    for want in [("discriminator", "dial-in"), ("discriminator", "dial-out"), ("generator", "dial-in"),
                 ("generator", "dial-out")]:  # fmt: skip
        problems.check(want in seen, "coverage", f"no rendered {want[0]} with a {want[1]} site")
    tests = {r.get("test") for r in results}
    problems.check({"grpc", "metrics"} <= tests, "coverage", f"helm test Pods rendered: {sorted(map(str, tests))}")
    Path(out_path).write_text(json.dumps(results, indent=1))
    for p in problems:
        print(f"check_rendered: {p}", file=sys.stderr)
    print(f"check_rendered: {len(files)} release(s), {len(results)} deployment(s), {len(problems)} problem(s)")
    return 1 if problems else 0


DOCKERFILE = Path(__file__).resolve().parents[1] / "docker" / "Dockerfile"


def image_env(dockerfile: Path = DOCKERFILE) -> dict[str, dict[str, str]]:
    """ASYNDGAN_* variables each image target sets with ENV (stages inherit from the one they are FROM)."""
    import shlex

    stages: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    text = dockerfile.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].upper() == "FROM":
            current = dict(stages.get(words[1], {}))
            if len(words) >= 4 and words[2].upper() == "AS":
                stages[words[3]] = current
        elif words and words[0].upper() == "ENV":
            for kv in shlex.split(line.split(None, 1)[1]):
                k, _, v = kv.partition("=")
                if k.startswith("ASYNDGAN_"):
                    current[k] = v
    return stages


def cmd_cli_args(path: str) -> int:
    import os
    from unittest import mock

    from asyndgan.cli import build_parser

    images = image_env()
    bad = 0
    for item in json.loads(Path(path).read_text()):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNDGAN_")}
        env |= images.get(item["role"], {}) | item.get("env", {})
        problem = ""
        with mock.patch.dict(os.environ, env, clear=True):
            try:
                a = build_parser().parse_args([item["role"], *item["args"]])
            except SystemExit:
                problem = "rejects"
            else:  # the CLI's own check after parsing (cmd_discriminator)
                if item["role"] == "discriminator" and a.connect and a.listen:
                    problem = f"refuses --connect with a listen address ({a.listen!r}; ASYNDGAN_LISTEN?)"
        if problem:
            print(
                f"check_rendered: {item['release']}: `asyndgan {item['role']}` {problem}: {item['args']}",
                file=sys.stderr,
            )
            bad += 1
    print(f"check_rendered: container args accepted by the asyndgan CLI ({bad} rejected)")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "manifests":
        return cmd_manifests(argv[1], argv[2:])
    if len(argv) == 2 and argv[0] == "cli-args":
        return cmd_cli_args(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
