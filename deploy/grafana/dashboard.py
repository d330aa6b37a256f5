"""The Grafana dashboard of stable-align, as code: `make dashboard` writes it where kustomize reads it.

Why code and not a hand-edited JSON export: panels stay reviewable in a diff, every query is a plain
string that `tests/unit/test_k8s_manifests.py` checks against the metrics the code exports (and the
TGI / NATS exporter metrics that Prometheus scrapes), and the committed JSON is tested to be exactly
what this file generates, so the two never drift. Plain dataclasses: no dashboard library needed.

Per-world panels use the `world_id` label of the world service's per-world gauges, which exist only
while the world runs in that replica (bounded cardinality); everything else is aggregated.

    python deploy/grafana/dashboard.py --out deploy/k8s/components/monitoring/dashboards/stablealign.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "k8s" / "components" / "monitoring" / "dashboards" / "stablealign.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
WIDTH = 24  # Grafana's grid width
# Metrics that other programs export, by the scrape job that collects them (prometheus.yml).
EXTERNAL_METRICS = {
    "tgi": ("tgi_queue_size", "tgi_batch_current_size", "tgi_request_duration_bucket", "tgi_request_count",
            "tgi_request_generated_tokens_sum"),
    "nats": ("gnatsd_varz_connections", "gnatsd_varz_in_msgs", "gnatsd_varz_out_msgs", "gnatsd_varz_slow_consumers",
             "gnatsd_varz_mem"),
}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]
    repeat_by_world: bool = False


@dataclass
class Dashboard:
    uid: str
    title: str
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict:
        panels: list[dict] = []
        y = 0
        next_id = 1
        for row in self.rows:
            row_panel = {"type": "row", "title": row.title, "id": next_id, "collapsed": False,
                         "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y}, "panels": []}
            if row.repeat_by_world:
                row_panel["repeat"] = "world_id"
            panels.append(row_panel)
            next_id += 1
            y += 1
            x = 0
            for panel in row.panels:
                if x + panel.width > WIDTH:
                    x, y = 0, y + panel.height
                panels.append({
                    "type": "timeseries", "id": next_id, "title": panel.title, "description": panel.description,
                    "datasource": DATASOURCE, "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
                    "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                                "tooltip": {"mode": "multi"}},
                    "targets": [{"refId": chr(ord("A") + i), "expr": q.expr, "legendFormat": q.legend,
                                 "datasource": DATASOURCE} for i, q in enumerate(panel.queries)],
                })
                next_id += 1
                x += panel.width
            y += max((p.height for p in row.panels), default=0)
        return {
            "uid": self.uid, "title": self.title, "tags": ["stable-align"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "panels": panels, "annotations": {"list": []},
            "templating": {"list": [{
                "name": "world_id", "label": "world", "type": "query", "datasource": DATASOURCE,
                "query": {"query": "label_values(stablealign_world_progress_ratio, world_id)", "refId": "worlds"},
                "definition": "label_values(stablealign_world_progress_ratio, world_id)",
                "refresh": 2, "multi": True, "includeAll": True, "current": {}, "options": [], "sort": 1,
            }]},
        }


def build() -> Dashboard:
    society = Row("Society (all worlds)", (
        Panel("Interactions / s", (
            Query('sum(rate(stablealign_world_interactions_total{outcome="published"}[1m]))', "published"),
            Query('sum by (outcome) (rate(stablealign_world_interactions_total{outcome!="published"}[1m]))',
                  "{{outcome}}"),
        ), unit="ops"),
        Panel("Mean alignment (last round)", (
            Query('max(stablealign_world_alignment_score{stage="before"})', "before revision"),
            Query('max(stablealign_world_alignment_score{stage="after"})', "after revision"),
        ), description="Population mean observer rating, 1-7."),
        Panel("Waits within the failure budget / s", (
            Query("sum by (step, kind) (rate(stablealign_world_failure_waits_total[5m]))", "{{step}} {{kind}}"),
        ), unit="ops", description="Interaction tries that wait for an absent service or a failing backend."),
        Panel("Requests / s by service", (
            Query("sum by (service, transport) (rate(stablealign_requests_total[1m]))", "{{service}} {{transport}}"),
        ), unit="reqps"),
    ))
    worlds = Row("World $world_id", (
        Panel("Progress", (
            Query('stablealign_world_progress_ratio{world_id=~"$world_id"}', "{{world_id}}"),
        ), unit="percentunit"),
        Panel("Records published", (
            Query('stablealign_world_records_published{world_id=~"$world_id"}', "{{world_id}}"),
        )),
    ), repeat_by_world=True)
    llm = Row("LLM backends", (
        Panel("LLM latency p50 / p95", (
            Query("histogram_quantile(0.5, sum by (le, backend) "
                  "(rate(stablealign_llm_request_duration_seconds_bucket[5m])))", "p50 {{backend}}"),
            Query("histogram_quantile(0.95, sum by (le, backend) "
                  "(rate(stablealign_llm_request_duration_seconds_bucket[5m])))", "p95 {{backend}}"),
        ), unit="s"),
        Panel("LLM errors and retries / s", (
            Query('sum by (backend, outcome) (rate(stablealign_llm_requests_total{outcome=~"error|retry"}[5m]))',
                  "{{backend}} {{outcome}}"),
        ), unit="ops"),
        Panel("TGI queue and batch", (
            Query("sum(tgi_queue_size)", "queued"),
            Query("sum(tgi_batch_current_size)", "in the batch"),
        ), description="text-generation-inference's own metrics (gpu overlay)."),
        Panel("TGI latency p95 and tokens / s", (
            Query("histogram_quantile(0.95, sum by (le) (rate(tgi_request_duration_bucket[5m])))", "p95 latency (s)"),
            Query("sum(rate(tgi_request_generated_tokens_sum[5m]))", "generated tokens / s"),
            Query("sum(rate(tgi_request_count[5m]))", "requests / s"),
        )),
    ))
    nats = Row("NATS", (
        Panel("Connections and slow consumers", (
            Query("sum(gnatsd_varz_connections)", "connections"),
            Query("sum(gnatsd_varz_slow_consumers)", "slow consumers"),
        )),
        Panel("Messages / s and memory", (
            Query("sum(rate(gnatsd_varz_in_msgs[1m]))", "in"),
            Query("sum(rate(gnatsd_varz_out_msgs[1m]))", "out"),
            Query("sum(gnatsd_varz_mem) / 1e6", "memory (MB)"),
        )),
    ))
    training = Row("Training", (
        Panel("Trainer loss", (
            Query("stablealign_trainer_loss", "loss"),
            Query("stablealign_trainer_loss_sft", "SFT"),
            Query("stablealign_trainer_loss_penalty", "penalty"),
        )),
        Panel("Trainer tokens / s", (Query("stablealign_trainer_tokens_per_second", "{{instance}}"),)),
        Panel("Training jobs", (
            Query("sum by (runner) (stablealign_trainer_jobs_running)", "running {{runner}}"),
            Query("sum by (runner) (stablealign_trainer_jobs_queued)", "queued {{runner}}"),
        )),
    ))
    return Dashboard(uid="stable-align", title="stable-align", rows=[society, worlds, llm, nats, training])


def render() -> str:
    return json.dumps(build().to_json(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.write_text(render(), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
