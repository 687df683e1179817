#!/usr/bin/env python3
"""The benchmark node's document (benches/lib/node.sh): a `--proxy` node carrying
containers on a converge network, WireGuard peers, published ports, DNS records, Caddy
routes to its own containers, metadata, and optionally a borg backup schedule.

--change applies ONE change per section on top of the same sizes (benches/scale_node.sh):
one container's env, one port added, one record changed, one peer added, one route
added, one metadata entry changed (and the generation given).
"""
import argparse
import base64
import hashlib
import json

p = argparse.ArgumentParser()
p.add_argument("--wg", required=True, help="WireGuard interface name")
p.add_argument("--network", default="apps", help="the containers' converge network")
p.add_argument("--containers", type=int, default=50)
p.add_argument("--peers", type=int, default=1000)
p.add_argument("--ports", type=int, default=10000)
p.add_argument("--records", type=int, default=5000)
p.add_argument("--routes", type=int, default=2000)
p.add_argument("--entries", type=int, default=100, help="metadata entries in all")
p.add_argument("--projects", type=int, default=1, help="metadata projects the entries spread over")
p.add_argument("--command", default="httpd", choices=["httpd", "sleep"],
               help="httpd: busybox httpd on 8000 serving /www (or /bin); sleep: sleepers")
p.add_argument("--www", default="/bin", help="what httpd serves")
p.add_argument("--borg", help="a local borg repository path: adds a backup schedule")
p.add_argument("--no-hostname", action="store_true",
               help="leave the host name alone (no UTS namespace here)")
p.add_argument("--generation", type=int, default=1)
p.add_argument("--change", action="store_true", help="one change in each section")
a = p.parse_args()
n = a.containers


def key(i):
    return base64.b64encode(hashlib.sha256(b"peer-%d" % i).digest()).decode()


command = (["httpd", "-f", "-p", "8000", "-h", a.www] if a.command == "httpd"
           else ["sleep", "1000000"])
containers = [{
    "name": f"svc-{i}", "image": "localhost/busybox:test",
    "command": command,
    "env": {"RUST_LOG": "info", "PORT": "8000"},
    "ports": [{"containerPort": 8000}],
    "resources": {"cpus": 0.5, "memory": "64Mi", "pids": 64},
    "labels": {"team": "core"},
    "network": a.network, "ip": f"10.89.{i // 250}.{i % 250 + 2}",
    "stopGracePeriod": "1s",
} for i in range(n)]
npeers = a.peers + (1 if a.change else 0)
peers = [{
    "name": f"peer-{i}", "publicKey": key(i),
    "endpoint": f"192.0.2.{i % 250 + 1}:51820",
    "allowedIps": [f"10.200.{i // 250}.{i % 250 + 1}/32"],
    "persistentKeepalive": 25,
} for i in range(npeers)]
nports = a.ports + (1 if a.change else 0)
ports = [{"protocol": "tcp", "hostPort": 10000 + i,
          "target": {"container": f"svc-{i % n}", "port": 8000}} for i in range(nports)]
records = [{"name": f"svc-{i}.internal", "type": "A",
            "values": [f"10.88.{i // 250}.{i % 250 + 1}"]} for i in range(a.records)]
nroutes = a.routes + (1 if a.change else 0)
routes = [{"name": f"route-{i}", "hosts": [f"app-{i}.example.com"], "tls": "off",
           "upstreams": [{"container": f"svc-{i % n}", "port": 8000}]} for i in range(nroutes)]
if a.projects == 1:
    projects = [("bench", {f"config/key-{i}": f"value-{i}" for i in range(a.entries)})]
else:
    per = a.entries // a.projects
    projects = [(f"bench-{j}", {f"config/key-{i}": f"value-{j}-{i}" for i in range(per)})
                for j in range(a.projects)]
def token(pid):
    # One token per project (bench-token for the first, "bench").
    return b"bench-token" if pid in ("bench", "bench-0") else b"bench-token-" + pid.encode()


if a.change:
    containers[0]["env"]["RUST_LOG"] = "debug"
    records[0]["values"] = ["10.88.255.1"]
    projects[0][1]["config/key-0"] = "changed"
doc = {
    "apiVersion": "converge/v1",
    "node": {"id": "bench-node", "mode": "proxy"},
    "generation": a.generation,
    "issuedAt": "2026-11-24T10:00:00Z",
    "networks": [{"name": a.network, "subnets": [{"subnet": "10.89.0.0/16"}]}],
    "containers": containers,
    "wireguard": {"interface": a.wg, "listenPort": 51820, "addresses": ["10.200.255.1/16"],
                  "peers": peers},
    "firewall": {"publishedPorts": ports},
    "dns": {"zone": "internal", "listen": ["127.0.0.1"], "port": 53, "records": records},
    "routes": {"routes": routes},
    "metadata": {"labels": {"role": "proxy"}, "hostname": "bench-node",
                 "projects": [{"id": pid, "tokenSha256": hashlib.sha256(token(pid)).hexdigest(),
                               "entries": entries} for pid, entries in projects]},
}
if a.no_hostname:
    del doc["metadata"]["hostname"]
if a.borg:
    doc["backups"] = {
        "repositories": [{"name": "local", "kind": "borg", "url": a.borg,
                          "passphraseSecret": "borg-passphrase"}],
        "schedules": [{"name": "www", "repository": "local", "paths": ["/etc/hostname"],
                       "cron": "30 2 * * *", "retention": {"keepDaily": 7}}],
    }
print(json.dumps(doc))
