"""The controller's sans-I/O half: the pipeline spec refuses what it cannot place (with an error
naming why), pipeline files load as TOML or YAML, and the reconciler's plan places, spreads,
replaces, moves, rolls out one agent at a time, halts, and removes retired services; selectors
on labels, regions, capabilities and GPU memory hold together; the diff says what changes and
what drifts; GPU memory is read from the metrics feed; a standby keeps the newer state. The
example pipelines in configs/pipelines/ validate, each service's config by its plugin's model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from atoll.agent.contract import parse
from atoll.agent.errors import InvalidRequest
from atoll.agent.metrics import MetricsRegistry
from atoll.agent.plugins import available_plugins
from atoll.plugins.controller.commands import load_spec
from atoll.plugins.controller.contract import PipelineSpec, leader
from atoll.plugins.controller.reconcile import (
    AgentView,
    ServiceState,
    State,
    StoredPipeline,
    diff,
    gpu_memory,
    plan,
)
from atoll.plugins.controller.replication import answer
from atoll.plugins.inference.plugin import InferenceConfig, make_backend
from support import REPO

PIPELINES = REPO / "configs" / "pipelines"


def spec(**services: dict[str, Any]) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "p", "services": services})


def stored(pipeline: PipelineSpec, **placed: dict[str, str]) -> StoredPipeline:
    states = {
        name: ServiceState(plugin=pipeline.services[name].plugin, placed=where)
        for name, where in placed.items()
    }
    return StoredPipeline(spec=pipeline, applied_at=0.0, services=states)


def gpu(name: str, region: str = "r1", *plugins: str, **kw: Any) -> AgentView:
    return AgentView(name, region, {"gpu": "true"}, frozenset(plugins), **kw)


INFERENCE = {"plugin": "inference", "replicas": 2, "where": {"labels": {"gpu": "true"}}}


@pytest.mark.parametrize(
    ("services", "error"),
    [
        ({}, "services: Dictionary should have at least 1 item"),
        ({"a": {"plugin": "inference", "where": {"gpus": 1}}}, r"a\.where\.gpus: Extra inputs"),
        ({"a": {"plugin": "inference", "replica": 2}}, "a.replica: Extra inputs"),
        ({"a": {"plugin": "inference", "replicas": -1}}, "greater than or equal to 0"),
        ({"a": {"plugin": "system"}}, "plugin 'system' cannot be placed"),
        ({"a": {"plugin": "controller"}}, "plugin 'controller' cannot be placed"),
        ({"a": {"plugin": "inference", "anti_affinity": ["a"]}}, "names 'a', not another"),
        ({"A": {"plugin": "inference"}}, "String should match pattern"),
    ],
)
def test_the_spec_refuses_what_it_cannot_place(services: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^bad pipeline: .*{error}"):
        parse(PipelineSpec, {"name": "p", "services": services}, "pipeline")


def test_pipeline_files_load_as_toml_or_yaml_and_bad_ones_say_why(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('name = "p"\n[services.inf]\nplugin = "inference"\nreplicas = "all"\n')
    yaml = tmp_path / "p.yaml"
    yaml.write_text("name: p\nservices:\n  inf: {plugin: inference, replicas: all}\n")
    assert load_spec(toml) == load_spec(yaml)
    for name, text, error in [
        ("bad.toml", "name = ", "cannot read the pipeline file"),
        ("bad.yaml", "name: [", "cannot read the pipeline file"),
        ("p.json", "{}", "ends in .toml, .yaml or .yml"),
        ("list.yaml", "- 1", "bad pipeline file list.yaml: value: Input should be"),
        ("sel.yaml", "name: p\nservices: {a: {plugin: x, where: {zone: 1}}}", "where.zone"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises((ValueError, InvalidRequest), match=error):
            load_spec(tmp_path / name)


def test_the_example_pipelines_validate(tmp_path: Path) -> None:
    files = sorted(PIPELINES.iterdir())
    assert {f.name for f in files} == {"llm-factory.toml", "llm-factory.yaml", "island.toml"}
    installed = available_plugins()
    for path in files:
        pipeline = load_spec(path)
        for name, service in pipeline.services.items():
            model = installed[service.plugin].load().config_model
            assert model is not None, (path.name, name)
            config = model.model_validate(service.config, context={"config_dir": None})
            if isinstance(config, InferenceConfig):  # the backend's own section, as at start
                ctx = SimpleNamespace(
                    data_dir=tmp_path, metrics=MetricsRegistry(),
                    settings=lambda m, raw: m.model_validate(raw, context={"config_dir": None}),
                )  # fmt: skip
                make_backend(config, ctx, None)  # type: ignore[arg-type]
    assert load_spec(PIPELINES / "llm-factory.toml") == load_spec(PIPELINES / "llm-factory.yaml")


def test_placement_spreads_regions_and_replaces_a_lost_replica() -> None:
    pipeline = stored(spec(inf=INFERENCE))
    views = {v.name: v for v in (gpu("a", "r1"), gpu("b", "r1"), gpu("c", "r2"))}
    views["cpu"] = AgentView("cpu", "r2")  # no gpu label: never chosen
    (action,) = plan(pipeline, views).actions
    assert (action.kind, action.agent) == ("add", "a")
    pipeline.services["inf"] = ServiceState(plugin="inference", placed={"a": action.digest})
    views["a"] = gpu("a", "r1", "inference")
    step = plan(pipeline, views)
    assert [a.agent for a in step.actions] == ["c"]  # r2 has none yet: spread first
    assert step.statuses[0].state == "progressing"
    pipeline.services["inf"].placed["c"] = action.digest
    views["c"] = gpu("c", "r2", "inference")
    step = plan(pipeline, views)
    assert step.actions == [] and step.statuses[0].state == "converged"
    views["a"] = gpu("a", "r1", "inference", alive=False, active=False)  # LOST
    step = plan(pipeline, views)
    assert [(a.kind, a.agent) for a in step.actions] == [("add", "b")]
    assert step.gone == [("inf", "a")]
    assert plan(pipeline, views, blocked={("inf", "b")}).statuses[0].state == "degraded"


def test_a_move_places_first_and_a_rollout_goes_one_agent_at_a_time() -> None:
    first = spec(inf=INFERENCE)
    old = first.services["inf"].digest()
    views = {v.name: v for v in (gpu("a", "r1", "inference"), gpu("b", "r1", "inference"))}
    views["c"] = gpu("c")
    moved = spec(inf={**INFERENCE, "where": {"agents": ["b", "c"]}})
    pipeline = stored(moved, inf={"a": old, "b": old})
    assert [(a.kind, a.agent) for a in plan(pipeline, views).actions] == [("add", "c")]
    pipeline.services["inf"].placed["c"] = old
    views["c"] = gpu("c", "r1", "inference")
    assert [(a.kind, a.agent) for a in plan(pipeline, views).actions] == [("remove", "a")]

    changed = spec(inf={**INFERENCE, "config": {"backend": "echo"}})
    assert changed.services["inf"].digest() != old
    pipeline = stored(changed, inf={"a": old, "b": old})
    step = plan(pipeline, views)
    assert [(a.kind, a.agent, a.config) for a in step.actions] == [
        ("reconfigure", "a", {"backend": "echo"})
    ]
    assert step.statuses[0].out_of_date == ["a", "b"]
    pipeline.services["inf"].halted = step.actions[0].digest  # a failed start halts it
    step = plan(pipeline, views)
    assert step.actions == [] and step.statuses[0].state == "halted"


def test_anti_affinity_gpu_memory_all_and_retired_services() -> None:
    pipeline = spec(
        inf={"plugin": "inference", "replicas": "all", "where": {"labels": {"gpu": "true"}}},
        train={
            "plugin": "training",
            "where": {"min_free_gpu_memory_mb": 8000},
            "anti_affinity": ["inf"],
        },
    )
    views = {
        "a": gpu("a", "r1", "inference", gpus=((24000, 20000),)),
        "b": gpu("b", "r1", gpus=((24000, 4000),)),
        "c": AgentView("c", "r1", gpus=((16000, 9000),)),
    }
    current = stored(pipeline, inf={"a": pipeline.services["inf"].digest()})
    step = plan(current, views)
    assert [(a.service, a.agent) for a in step.actions] == [("inf", "b"), ("train", "c")]
    assert step.statuses[0].desired == 2
    # A trainer's own memory use does not move it: free memory counts only for placing.
    current.services["train"] = ServiceState(plugin="training", placed={"c": "x"})
    views["c"] = AgentView("c", "r1", plugins=frozenset({"training"}), gpus=((16000, 1000),))
    assert plan(current, views).statuses[1].agents == ["c"]
    current.deleting = True
    step = plan(current, views)
    assert [(a.kind, a.agent) for a in step.actions] == [("remove", "a"), ("remove", "c")]
    assert {s.state for s in step.statuses} == {"removing"}


def test_selectors_on_region_capabilities_and_gpu_memory() -> None:
    """Every criterion of ``where`` must hold: a region among those named, a capability some
    plugin announces (equal, or in its list), a GPU with that much memory in all."""
    where = {
        "regions": ["eu"],
        "capabilities": {"base_model": "llama-3-8b"},
        "min_gpu_memory_mb": 40000,
    }
    pipeline = stored(spec(inf={"plugin": "inference", "replicas": "all", "where": where}))
    serves = {"inference": {"base_model": "llama-3-8b"}}
    lists = {"inference": {"base_model": ["smol", "llama-3-8b"]}}
    big = ((80000, 1000),)  # nearly full now: total memory is what counts
    views = {
        "fit": AgentView("fit", "eu", capabilities=serves, gpus=big),
        "listed": AgentView("listed", "eu", capabilities=lists, gpus=big),
        "us": AgentView("us", "us", capabilities=serves, gpus=big),
        "other": AgentView("other", "eu", capabilities={"inference": {"base_model": "x"}},
                           gpus=big),
        "small_gpu": AgentView("small_gpu", "eu", capabilities=serves, gpus=((24000, 24000),)),
        "no_gpu": AgentView("no_gpu", "eu", capabilities=serves),
    }  # fmt: skip
    placed = pipeline.services.setdefault("inf", ServiceState(plugin="inference"))
    for _ in range(len(views)):  # one placement a step
        step = plan(pipeline, views)
        if not step.actions:
            break
        for action in step.actions:
            placed.placed[action.agent] = action.digest
            views[action.agent] = replace(views[action.agent], plugins=frozenset({"inference"}))
    assert sorted(placed.placed) == ["fit", "listed"]
    assert step.statuses[0].desired == 2 and step.statuses[0].state == "converged"


def test_the_diff_says_what_changes_and_which_services_drift() -> None:
    applied = stored(spec(inf=INFERENCE, emb={"plugin": "inference", "replicas": 1}))
    views = {v.name: v for v in (gpu("a", "r1", "inference"), gpu("b", "r1"))}
    applied.services["inf"] = ServiceState(
        plugin="inference", placed={"a": applied.spec.services["inf"].digest()}
    )
    now = plan(applied, views).statuses  # inf: 1 of 2 placed
    new = spec(inf={**INFERENCE, "replicas": 3}, train={"plugin": "training"})
    found = {d.name: d for d in diff(applied, new, now).services}
    assert (found["inf"].change, found["inf"].fields, found["inf"].drift) == (
        "changed", ["replicas"], True
    )  # fmt: skip
    assert (found["emb"].change, found["train"].change) == ("removed", "added")
    assert diff(None, new, []).exists is False


def test_the_active_controller_is_the_first_live_one_with_the_role() -> None:
    c = ("controller",)
    assert leader([("b", c, ["controller"], True), ("a", c, ["controller"], True)]) == "a"
    assert leader([("b", c, ["controller"], True), ("a", c, ["controller"], False)]) == "b"
    assert leader([("a", ("operator",), ["controller"], True)]) is None  # not signed for it
    assert leader([("a", c, ["system"], True)]) is None


def test_gpu_memory_comes_from_the_metrics_feed() -> None:
    gib = 1 << 30
    feed = {"system": {"gpus": [
        {"index": 0, "memory_total_bytes": 24 * gib, "memory_used_bytes": 20 * gib},
        {"index": 1, "name": "no NVML memory reading"},
    ]}}  # fmt: skip
    assert gpu_memory(feed) == ((24 * 1024, 4 * 1024),)
    assert gpu_memory(None) == () == gpu_memory({"system": {}})


def test_a_standby_keeps_the_newer_state_by_term_then_version() -> None:
    old_active = State(term=1, version=40)  # went on alone after it was replaced
    successor = State(term=2, version=3)
    keep, reply = answer(successor, old_active)
    assert keep is None and reply.stamp == (2, 3) and reply.state is not None  # "take mine"
    keep, reply = answer(old_active, successor)
    assert keep is successor and reply.state is None
    keep, reply = answer(successor, successor.model_copy())
    assert keep is None and reply.state is None  # in step: nothing to send back
