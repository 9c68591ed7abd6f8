"""docs/grafana-dashboard.json asks only for what a node exports, by the names and labels it
exports them under, and those names follow Prometheus' conventions."""

import json
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from swarm import NodeProcess

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"


def exported(tmp_path) -> dict[str, set[str]]:
    """sample name -> label names, scraped from a live node."""
    node = NodeProcess(tmp_path / "n", metrics_port=0).start()
    try:
        with urllib.request.urlopen(node.wait_ready()["metrics"], timeout=5) as response:
            text = response.read().decode()  # 127.0.0.1 only
    finally:
        node.stop()
    families = list(text_string_to_metric_families(text))
    kvx = [f for f in families if f.name.startswith("kvx_")]
    for family in kvx:
        assert family.documentation, family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
    samples: dict[str, set[str]] = {}
    for family in kvx:
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
        if not family.samples:  # labelled, nothing counted yet: its labels cannot be read
            suffix = {"counter": "_total", "histogram": "_bucket"}.get(family.type, "")
            samples[family.name + suffix] = {"*"}
    return samples


def test_every_query_names_an_exported_series_and_label(tmp_path):
    samples = exported(tmp_path)
    assert "kvx_time_to_first_token_seconds_bucket" in samples
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [t for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(targets) >= 12
    queries = [(t["expr"], t.get("legendFormat", "")) for t in targets]
    queries += [(v["query"], "") for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for expr, legend in queries:
        names = re.findall(r"\bkvx_[a-z_]+", expr)
        assert names, expr
        for name in names:
            assert name in samples, f"{name} (in {expr!r}) is not exported"
        labels = set().union(*(samples[n] for n in names)) | {"instance", "le"}
        if "*" in labels:
            continue
        grouped = re.findall(r"by \(([^)]*)\)", expr)
        wanted = {x.strip() for g in grouped for x in g.split(",")}
        wanted |= set(re.findall(r"\{\{(\w+)\}\}", legend))
        assert wanted <= labels, f"{expr!r} groups by {wanted - labels}, which it lacks"
