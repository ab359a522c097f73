"""Write deploy/k8s/base/prometheusrule.yaml from alerts.yml (`make rules`): the Prometheus
Operator's PrometheusRule carries the same rules, whose one source is alerts.yml."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "alerts.yml"
MANIFEST = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"
HEADER = """\
# Generated from deploy/prometheus/alerts.yml by `make rules`: edit that file, not this one.
# Prometheus Operator (kube-prometheus-stack) loads these rules. Your Prometheus may select
# PrometheusRules by a label (e.g. `release: kube-prometheus-stack`): add it in an overlay.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: realtime-relay
  labels:
    app.kubernetes.io/name: realtime-relay
spec:
"""


def render() -> str:
    body = [line for line in RULES.read_text().splitlines() if not line.startswith("#")]
    return HEADER + "\n".join(f"  {line}" if line else "" for line in body).lstrip("\n") + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if MANIFEST.read_text() == render() else 1)
    MANIFEST.write_text(render())
