"""Adapters loaded and unloaded at runtime (only inside --adapter-root), and /metrics."""

from __future__ import annotations

import os
import shutil

import pytest
import requests

PROMPT = "The capital of Italy is"


def _post(s, path, body):
    return requests.post(f"{s.url}{path}", json=body, timeout=60)


@pytest.fixture
def root(tmp_path, adapter_dirs):
    """An adapter root holding a copy of 'butler'; beside it, outside the root, a copy of 'robot'."""
    inside = tmp_path / "root"
    shutil.copytree(adapter_dirs["butler"], inside / "team" / "butler")
    shutil.copytree(adapter_dirs["robot"], tmp_path / "outside" / "robot")
    return inside


def test_load_use_and_unload(server_factory, adapter_dirs, root, reference):
    s = server_factory(adapters={"pirate": adapter_dirs["pirate"]}, adapter_root=root)
    client = s.client()
    r = _post(s, "/v1/load_lora_adapter", {"lora_name": "jeeves", "lora_path": "team/butler"})
    assert r.status_code == 200, r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["jeeves"].parent == "tiny-base" and models["jeeves"].root == str(root / "team" / "butler")
    answer = client.completions.create(model="jeeves", prompt=PROMPT, max_tokens=12, temperature=0)
    assert answer.choices[0].text == reference("butler", PROMPT, 12)
    # an absolute path inside the root works too; a taken name is refused
    r = _post(s, "/v1/load_lora_adapter", {"lora_name": "jeeves", "lora_path": str(root / "team" / "butler")})
    assert r.status_code == 400 and "taken" in r.json()["error"]["message"]
    assert _post(s, "/v1/unload_lora_adapter", {"lora_name": "jeeves"}).status_code == 200
    assert "jeeves" not in [m.id for m in client.models.list().data]
    r = _post(s, "/v1/completions", {"model": "jeeves", "prompt": "hi"})
    assert r.status_code == 404
    r = _post(s, "/v1/unload_lora_adapter", {"lora_name": "jeeves"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    # adapters given at start-up can be unloaded too
    assert _post(s, "/v1/unload_lora_adapter", {"lora_name": "pirate"}).status_code == 200


def test_paths_outside_the_root_are_refused(server_factory, root, tmp_path):
    s = server_factory(adapters={}, adapter_root=root)
    (root / "escape").symlink_to(tmp_path / "outside" / "robot")
    (root / "team" / "link").symlink_to(tmp_path / "outside")
    for path in [
        "../outside/robot",
        "team/../../outside/robot",
        str(tmp_path / "outside" / "robot"),
        "escape",
        "team/link/robot",
        "/etc",
    ]:
        r = _post(s, "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": path})
        assert r.status_code == 400, path
        err = r.json()["error"]
        assert err["param"] == "lora_path" and "outside the adapter root" in err["message"]
    assert [m.id for m in s.client().models.list().data] == ["tiny-base"]


def test_bad_adapters_are_refused_before_any_request_can_use_them(server_factory, root, adapter_dirs):
    s = server_factory(adapters={}, adapter_root=root)
    (root / "empty").mkdir()
    bad = root / "broken"
    shutil.copytree(adapter_dirs["pirate"], bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    for name, path in [("none", "empty"), ("missing", "nowhere"), ("broken", "broken")]:
        r = _post(s, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "lora_path"
    for body in [
        {"lora_path": "team/butler"},
        {"lora_name": "x"},
        {"lora_name": "a b", "lora_path": "team/butler"},
        {"lora_name": "tiny-base", "lora_path": "team/butler"},
        {"lora_name": 3, "lora_path": "x"},
    ]:
        assert _post(s, "/v1/load_lora_adapter", body).status_code == 400, body
    assert [m.id for m in s.client().models.list().data] == ["tiny-base"]
    r = _post(s, "/v1/load_lora_adapter", {"lora_name": "ok", "lora_path": "team/butler"})
    assert r.status_code == 200  # the server is unharmed


def test_runtime_loading_is_off_without_a_root(served):
    r = _post(served, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": os.getcwd()})
    assert r.status_code == 404 and "--adapter-root" in r.json()["error"]["message"]
    assert _post(served, "/v1/unload_lora_adapter", {"lora_name": "pirate"}).status_code == 404
    assert "pirate" in [m.id for m in served.client().models.list().data]


def test_metrics_parse_and_count(served):
    from prometheus_client.parser import text_string_to_metric_families

    client = served.client()
    client.completions.create(
        model="pirate", prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    list(
        client.completions.create(
            model="butler",
            prompt=PROMPT,
            max_tokens=4,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    r = requests.get(f"{served.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name, kind in [
        ("loraforge:num_requests_running", "gauge"),
        ("loraforge:num_requests_waiting", "gauge"),
        ("loraforge:time_to_first_token_seconds", "histogram"),
        ("loraforge:inter_token_latency_seconds", "histogram"),
        ("loraforge:e2e_request_latency_seconds", "histogram"),
        ("loraforge:prompt_tokens", "counter"),
        ("loraforge:generation_tokens", "counter"),
        ("loraforge:request_success", "counter"),
        ("loraforge:lora_requests_info", "gauge"),
    ]:
        assert families[name].type == kind, name

    def value(family, sample_name, **labels):
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("loraforge:generation_tokens", "loraforge:generation_tokens_total", model_name="pirate") >= 5
    assert value("loraforge:generation_tokens", "loraforge:generation_tokens_total", model_name="butler") >= 4
    ttft = "loraforge:time_to_first_token_seconds"
    count = value(ttft, ttft + "_count", model_name="butler")
    assert count >= 1 and value(ttft, ttft + "_bucket", model_name="butler", le="+Inf") == count
    buckets = [
        s.value
        for s in families[ttft].samples
        if s.name == ttft + "_bucket" and s.labels["model_name"] == "butler"
    ]
    assert buckets == sorted(buckets)  # cumulative
    itl = "loraforge:inter_token_latency_seconds"
    assert value(itl, itl + "_count", model_name="butler") >= 3  # one per token after the first
    assert (
        value("loraforge:request_success", "loraforge:request_success_total", finished_reason="length") >= 2
    )
    info = families["loraforge:lora_requests_info"].samples[0].labels
    assert info["max_lora"] == "8" and "pirate" in info["resident_lora_adapters"].split(",")
    assert value("loraforge:num_requests_running", "loraforge:num_requests_running") == 0


def test_metrics_text_escapes_label_values():
    from prometheus_client.parser import text_string_to_metric_families

    from loraforge.serving.metrics import Counter

    c = Counter("x_total", "help")
    c.inc(2, model_name='a "quoted"\\name\nnext')
    (family,) = text_string_to_metric_families("\n".join(c.lines()) + "\n")
    assert family.samples[0].labels["model_name"] == 'a "quoted"\\name\nnext' and family.samples[0].value == 2
