"""The gateway's /metrics on a live island: its own series from the first scrape, GenAI
semantic-convention histograms with buckets, labels bounded in cardinality, an exposition
`promtool check metrics` passes, and a Grafana dashboard whose queries name only series a real
scrape has."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from support.island import Island

DASHBOARD = Path(__file__).parents[2] / "configs" / "grafana" / "atoll.json"
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "the quick brown fox jumps"}
]
GPU = {"index": 0, "name": "Test GPU", "utilization_percent": 50.0, "memory_used_bytes": 1 << 30,
       "memory_total_bytes": 8 << 30, "temperature_c": 40.0, "power_w": 100.0}  # fmt: skip

promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool comes with Debian's prometheus package (.ci/run installs it)",
)


class FakeNvml:
    """One GPU's readings, so a CPU-only machine's feed has the GPU series a dashboard shows."""

    def read(self) -> list[dict[str, Any]]:
        return [dict(GPU)]

    def close(self) -> None:
        pass


async def scrape(isl: Island, accept: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {isl.admin_key}"}
    if accept:
        headers["Accept"] = accept
    async with httpx.AsyncClient(base_url=isl.url, timeout=30) as http:
        reply = await http.get("/metrics", headers=headers)
    assert reply.status_code == 200
    return reply


def samples(text: str) -> dict[str, list[Any]]:
    """Sample name -> its samples."""
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


async def busy_island(make_agent) -> Island:
    """An island whose gateway has answered chat, completion and streamed requests (with and
    without an adapter, in a project) and timed one out, and whose node's latest feed message
    (and a GPU reading) came after them."""
    isl = Island(make_agent)
    node = await isl.add_node("gpu1", delay=0.01)
    node.feed.collector._nvml = FakeNvml()  # type: ignore[assignment]
    await (await isl.start_gateway(request_timeout=1.0)).models_seen("echo")
    acc = isl.accounts
    acc.create_user("alice", actor="test")
    acc.create_project("cardio", actor="test")
    acc.add_member("cardio", "alice", "member", actor="test")
    acc.register_adapter("cardio/notes", "echo", project="cardio", actor="test")
    key = isl.key("alice", project="cardio")
    api = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)
    async with api:
        await api.chat.completions.create(model="echo", messages=PROMPT)
        await api.chat.completions.create(model="cardio/notes", messages=PROMPT)
        stream = await api.chat.completions.create(model="echo", messages=PROMPT, stream=True)
        async for _ in stream:
            pass
        await api.completions.create(model="echo", prompt="one two three")
        with pytest.raises(openai.APIStatusError) as late:  # 200 words at 10 ms: past 1 s
            await api.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "word " * 200}]
            )
        assert late.value.status_code == 504
    served = node.host.plugins["inference"].ctx.metrics.snapshot()["requests"]["series"][0]
    for _ in range(100):  # until the node's feed message carries all five requests
        text = (await scrape(isl)).text
        done = samples(text).get("atoll_inference_requests_total", [])
        if [s.value for s in done if s.labels["agent"] == "gpu1"] == [served["value"]]:
            return isl
        await asyncio.sleep(0.1)
    raise AssertionError("the node's feed never reached the gateway")


async def test_the_first_scrape_has_the_gateways_own_series(make_agent) -> None:
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    # No feed message of its own for an hour: whatever the scrape has of it was built on the spot.
    await (await isl.start_gateway(metrics_interval=3600)).models_seen("echo")
    first = samples((await scrape(isl)).text)
    assert first["atoll_metrics_timestamp_seconds"][0].labels == {"agent": "gw"}  # own first
    assert "gw" not in isl.plugin.gateway.watch.metrics
    key = isl.key("alice")
    async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key) as api:
        await api.chat.completions.create(model="echo", messages=PROMPT)
    now = samples((await scrape(isl)).text)
    (requests,) = now["atoll_gateway_requests_total"]
    assert requests.value == 1 and requests.labels == {
        "agent": "gw", "model": "echo", "adapter": "", "project": ""
    }  # fmt: skip
    genai = {"agent": "gw", "gen_ai_operation_name": "chat", "gen_ai_request_model": "echo"}
    for name in (
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_request_duration_seconds",
        "gen_ai_server_time_per_output_token_seconds",
    ):
        (count,) = now[f"{name}_count"]
        assert count.value == 1 and genai.items() <= count.labels.items()
        buckets = now[f"{name}_bucket"]
        assert len(buckets) > 10 and buckets[-1].labels["le"] == "+Inf"
    tokens = {s.labels["gen_ai_token_type"]: s.value for s in now["gen_ai_client_token_usage_sum"]}
    assert tokens == {"input": 5, "output": 5}  # the echo node counts five words each way


async def test_labels_past_the_budget_fold_into_other(make_agent) -> None:
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await (await isl.start_gateway(metrics_label_values=2)).models_seen("echo")
    for i in range(5):
        isl.accounts.register_adapter(f"shared/a{i}", "echo", public=True, actor="test")
    async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice")) as api:
        for i in range(5):
            await api.chat.completions.create(model=f"shared/a{i}", messages=PROMPT)
        await api.chat.completions.create(model="shared/a0", messages=PROMPT)
    requests = samples((await scrape(isl)).text)["atoll_gateway_requests_total"]
    by_adapter = {s.labels["adapter"]: s.value for s in requests}
    assert by_adapter == {"shared/a0": 2, "shared/a1": 1, "other": 3}


@promtool
async def test_promtool_finds_nothing_to_fix(make_agent) -> None:
    isl = await busy_island(make_agent)
    reply = await scrape(isl)
    text = reply.text
    # What the traffic above must have put there, so the check covers it.
    assert 'gen_ai_server_request_duration_seconds_bucket{agent="gw",error_type="504"' in text
    assert 'adapter="cardio/notes"' in text and 'project="cardio"' in text
    assert 'atoll_inference_time_per_output_token_seconds_bucket{agent="gpu1"' in text
    assert 'atoll_gpu_info{agent="gpu1",gpu="0",name="Test GPU"} 1.0' in text
    check = await asyncio.create_subprocess_exec(
        "promtool", "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(check.communicate(reply.content), 60)
    assert (check.returncode, out, err) == (0, b"", b""), err.decode()
    # promtool reads only the text format; the OpenMetrics one must satisfy its strict parser.
    reply = await scrape(isl, "application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in openmetrics_families(reply.text)}
    assert families["gen_ai_server_time_to_first_token_seconds"].unit == "seconds"
    assert set(families) == {f.name for f in text_string_to_metric_families(text)} - {
        "atoll_gpu_info"  # an info family in OpenMetrics: atoll_gpu
    } | {"atoll_gpu"}


def promql_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are neither functions,
    keywords, label names nor inside label matchers, strings or ranges."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set(re.findall(r"(?<![\w$:])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr))
    return names - {"and", "or", "unless", "bool", "offset", "group_left", "group_right"}


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return queries


def test_promql_names() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, agent) (rate(x_bucket{agent=~"$agent", a="b{"}'
        "[$__rate_interval]))) / on (agent) group_left sum(y_total) + topk(5, z) and w"
    )
    assert promql_names(expr) == {"x_bucket", "y_total", "z", "w"}


async def test_the_grafana_dashboard_names_only_series_a_scrape_has(make_agent) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 12
    isl = await busy_island(make_agent)
    scraped = set(samples((await scrape(isl)).text))
    for query in queries:
        names = promql_names(query)
        assert names, query
        assert names <= scraped, (query, names - scraped)
