#!/usr/bin/env bash
# Prometheus and Grafana on the head node, the way Ray's docs set them up for VM clusters, so the dashboard's
# Metrics view works and the scoder-ray dashboard (this folder's JSON) is one click away. Run after
# `ray start --head` (cluster/aws.yaml and gcp.yaml do), with the head's venv active; needs the internet
# (Prometheus and Grafana are downloaded once per node). Ports stay on 127.0.0.1: reach them with
# `ray dashboard cluster/aws.yaml` (8265) plus `ssh -L 3000:127.0.0.1:3000` for Grafana.
set -euo pipefail
GRAFANA_VERSION=${GRAFANA_VERSION:-11.2.2}
here=$(cd "$(dirname "$0")" && pwd)
session=/tmp/ray/session_latest/metrics

# Prometheus, scraping every node Ray's service discovery lists (Ray writes the config, the download is
# Prometheus's own release).
mkdir -p ~/prometheus && cd ~/prometheus
pgrep -x prometheus >/dev/null || ray metrics launch-prometheus >~/prometheus/launch.log 2>&1

# Grafana OSS with the configuration and provisioning Ray generated for this session (data source
# Prometheus on 127.0.0.1:9090, Ray's dashboards), plus ours.
if [ ! -x ~/grafana/bin/grafana ]; then
  mkdir -p ~/grafana
  curl -fsSL "https://dl.grafana.com/oss/release/grafana-${GRAFANA_VERSION}.linux-amd64.tar.gz" \
    | tar -xz -C ~/grafana --strip-components=1
fi
cp "$here/scoder-ray-dashboard.json" "$session/grafana/dashboards/"
pgrep -f "grafana server" >/dev/null || nohup ~/grafana/bin/grafana server --homepath ~/grafana \
  --config "$session/grafana/grafana.ini" web >/tmp/ray/grafana.log 2>&1 &
echo "Prometheus on 127.0.0.1:9090, Grafana on 127.0.0.1:3000 (dashboard: scoder-ray)"
