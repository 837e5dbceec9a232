"""Checks on `helm template` output that schema validation cannot make (run by scripts/helm_lint.sh).

check_rendered.py manifests OUT.json RENDERED.yaml...   (needs PyYAML: the tools venv)
    cross-references inside each release (selectors, ports, volumes, probes vs TLS, NetworkPolicy, ServiceMonitor,
    dashboard) and writes each Deployment's container args to OUT.json
check_rendered.py cli-args OUT.json                     (needs asyndgan: the project venv)
    parses those args with the real `asyndgan` argument parser, so the chart cannot drift from the CLI
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
        psc = pspec.get("securityContext", {})
        problems.check(psc.get("runAsNonRoot") is True, where, "pod securityContext.runAsNonRoot")
        (container,) = pspec["containers"]
        role = container["name"]
        problems.check(role in ("generator", "discriminator"), where, f"container name {role!r} is not a role")
        problems.check(labels.get("app.kubernetes.io/component") == role, where, "component label != role")
        sc = container.get("securityContext", {})
        problems.check(sc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem")
        problems.check(sc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation: false")
        problems.check("ALL" in sc.get("capabilities", {}).get("drop", []), where, "capabilities.drop ALL")
        volumes = {v["name"]: v for v in pspec.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for m in mounts.values():
            problems.check(m["name"] in volumes, where, f"volumeMount {m['name']} has no volume")
        tmp = mounts.get("/tmp")
        problems.check(tmp and "emptyDir" in volumes.get(tmp["name"], {}), where, "/tmp must be an emptyDir")
        args: list[str] = container.get("args", [])
        flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in args if a.startswith("--"))
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        listen_port = int(flags.get("listen", ":0").rsplit(":", 1)[1])
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
        if role == "discriminator":
            data = mounts.get("/data")
            if data:
                problems.check(data.get("readOnly"), where, "data volume must be mounted read-only")
        for v in volumes.values():
            claim = v.get("persistentVolumeClaim", {}).get("claimName", "")
            if claim.endswith("-checkpoints"):
                pvcs = [p["metadata"]["name"] for p in by_kind.get("PersistentVolumeClaim", [])]
                problems.check(claim in pvcs, where, f"PVC {claim} not rendered")
        out.append({"release": name, "role": role, "args": args})

        # Service, NetworkPolicy, ServiceMonitor, dashboard
        services = by_kind.get("Service", [])
        problems.check(len(services) == 1, name, "expected one Service")
        for svc in services:
            problems.check(subset(svc["spec"]["selector"], labels), name, "Service selector does not match the pod")
            for sp in svc["spec"]["ports"]:
                problems.check(sp["targetPort"] in ports, name, f"Service targetPort {sp['targetPort']} not a port")
        if role == "discriminator":
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
            problems.check(
                subset(sm["spec"]["selector"]["matchLabels"], services[0]["metadata"]["labels"]),
                name,
                "ServiceMonitor selector does not match the Service",
            )
            sport_names = {p["name"] for p in services[0]["spec"]["ports"]}
            problems.check(all(e["port"] in sport_names for e in sm["spec"]["endpoints"]), name, "ServiceMonitor port")
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
    Path(out_path).write_text(json.dumps(results, indent=1))
    for p in problems:
        print(f"check_rendered: {p}", file=sys.stderr)
    print(f"check_rendered: {len(files)} release(s), {len(results)} deployment(s), {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_cli_args(path: str) -> int:
    from asyndgan.cli import build_parser

    bad = 0
    for item in json.loads(Path(path).read_text()):
        try:
            build_parser().parse_args([item["role"], *item["args"]])
        except SystemExit:
            print(
                f"check_rendered: {item['release']}: `asyndgan {item['role']}` rejects {item['args']}", file=sys.stderr
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
