"""GET /metrics after a known workload, through real peer processes: the counters equal what the
clients were told (usage, statuses), the distributions counted what happened, a killed peer
shows as a failover on the entry, and strangers' paths cannot grow the label set."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.peers.processes import Swarm, serving_replica, stream_chat, wait_until


@pytest.fixture(scope="module")
def swarm(tiny_models, tmp_path_factory):
    s = Swarm(tiny_models["llama"], tmp_path_factory.mktemp("metrics"))
    try:
        s.add("0:2")
        s.add("2:4")
        s.add("2:4")
        s.wait_ready()
        s.wait_route(s.peers[0])
        yield s
    finally:
        s.stop()


def scrape(peer) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    r = httpx.get(f"{peer.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def grew(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def complete(entry, i: int) -> dict:
    """The usage of a greedy completion of 3 + i tokens."""
    body = {
        "model": "llama",
        "prompt": f"count {i}",
        "max_tokens": 3 + i,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = httpx.post(f"{entry.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def stream_usage(entry, i: int) -> dict:
    """The usage of a streamed chat of 6 tokens, from its last usage event."""
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": f"stream {i}"}],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{entry.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        usage = [line for line in r.iter_lines() if '"usage"' in line and '"choices": []' in line]
    return httpx.Response(200, content=usage[-1][len("data: ") :]).json()["usage"]


@pytest.fixture(scope="module")
def workload(swarm):
    """Five completions, two streamed chats, a refused request and five strangers' paths on the
    entry: (its scrape before, its scrape after, the usages the clients were told)."""
    entry = swarm.peers[0]
    before = scrape(entry)
    usages = [complete(entry, i) for i in range(5)] + [stream_usage(entry, i) for i in range(2)]
    bad = httpx.post(f"{entry.url}/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400
    for i in range(5):  # strangers' paths: one label value for all of them
        assert httpx.get(f"{entry.url}/probe-{i}").status_code == 404
    return before, scrape(entry), usages


def test_counters_match_the_workload(workload):
    before, after, usages = workload
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 5 * 3 + 10 + 2 * 6
    assert grew(before, after, "layerswarm_generated_tokens_total") == generated
    assert grew(before, after, "layerswarm_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew(before, after, "layerswarm_time_to_first_token_seconds_count") == 7
    # one observation between each two of a generation's steps; drafting may bring several at once
    assert grew(before, after, "layerswarm_inter_token_seconds_count") == generated - 7


def test_http_requests_count_by_route_and_status(workload):
    before, after, _ = workload

    def requests(endpoint: str, status: str) -> float:
        return grew(before, after, "layerswarm_http_requests_total", endpoint=endpoint, status=status)

    assert requests("/v1/completions", "200") == 5
    assert requests("/v1/chat/completions", "200") == 2
    assert requests("/v1/completions", "400") == 1
    assert requests("other", "404") == 5
    assert not any(k[0] == "layerswarm_http_requests_total" and "probe" in str(k[1]) for k in after)
    assert (
        grew(before, after, "layerswarm_http_request_duration_seconds_count", endpoint="/v1/completions") == 6
    )


def test_the_peer_is_read_when_scraped(swarm, workload):
    _, after, _ = workload
    entry = swarm.peers[0]
    assert value(after, "layerswarm_table_peers", status="serving") == 3
    assert value(after, "layerswarm_gossip_dropped_entries_total", reason="rate") == 0  # an honest swarm
    assert value(after, "layerswarm_kv_slots_budget") == 65536
    assert value(after, "layerswarm_ready") == 1
    assert value(after, "layerswarm_peer_info", peer_id=entry.peer_id, model="llama", layers="0:2") == 1


def test_every_hop_observed_its_forwards_where_they_ran(swarm, workload):
    entry = swarm.peers[0]
    for peer in swarm.peers:
        m = scrape(peer)
        forwards = value(m, "layerswarm_forward_seconds_count")
        assert forwards > 0 or peer is not entry and value(m, "layerswarm_steps_served_total") == 0
        assert value(m, "layerswarm_forward_batch_steps_count") == forwards
        assert value(m, "layerswarm_step_queue_wait_seconds_count") >= value(
            m, "layerswarm_steps_served_total"
        )
        assert value(m, "layerswarm_gossip_round_trip_seconds_count") > 0


def test_a_request_id_travels_to_every_peer_of_the_route(swarm):
    entry = swarm.peers[0]
    body = {"model": "llama", "prompt": "follow me", "max_tokens": 4, "temperature": 0}
    r = httpx.post(
        f"{entry.url}/v1/completions", json=body, headers={"x-request-id": "trace-42.a"}, timeout=60
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42.a"
    made = httpx.post(f"{entry.url}/v1/completions", json=body, timeout=60).headers["x-request-id"]
    assert len(made) == 32 and made != "trace-42.a"  # one of its own when the client sent none
    # the entry's request line, and a step line on the entry and on the hop that served 2:4
    served = [p for p in swarm.peers[1:] if "trace-42.a" in p.log_path.read_text(errors="replace")]
    assert len(served) == 1, "one replica of 2:4 served the request"
    for peer in (entry, served[0]):
        lines = [
            line
            for line in peer.log_path.read_text(errors="replace").splitlines()
            if "[request trace-42.a]" in line
        ]
        assert any("step of session" in line for line in lines), lines
    request_lines = [
        line for line in entry.log_path.read_text().splitlines() if "POST /v1/completions 200" in line
    ]
    assert any("4 tokens" in line and "[request trace-42.a]" in line for line in request_lines), request_lines
    for bad in ("x" * 65, "two words", "<script>"):
        r = httpx.post(f"{entry.url}/v1/completions", json=body, headers={"x-request-id": bad}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-request-id", r.text


def test_start_up_says_what_it_loaded_and_where_to_find_the_peer(swarm):
    for peer in swarm.peers:
        log = peer.log_path.read_text(errors="replace")
        assert "MB of weights in" in log and f"OpenAI API at http://{peer.address}/v1" in log, log[-2000:]
        assert f"swarm page at http://{peer.address}/" in log


def test_peer_status_prints_json_and_watches(swarm):
    import json
    import subprocess
    import sys

    entry = swarm.peers[0]
    cmd = [sys.executable, "-m", "peers.cli", "status", "--peer", entry.address]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60, check=True).stdout
    table = json.loads(out)
    assert table["me"] == entry.peer_id and len(table["peers"]) == 3
    import threading

    watch = subprocess.Popen([*cmd, "--watch", "0.3"], stdout=subprocess.PIPE, text=True)
    # read until two tables came (the command starts in ~5 s on 2 cores, far more under load)
    deadline = threading.Timer(60, watch.terminate)
    deadline.start()
    out = ""
    try:
        for line in watch.stdout:
            out += line
            if out.count("Ctrl-C stops") >= 2 and out.count(entry.peer_id) >= 2:
                break
    finally:
        deadline.cancel()
        watch.terminate()
        watch.communicate(timeout=10)
    assert out.count("Ctrl-C stops") >= 2 and out.count(entry.peer_id) >= 2, out[-2000:]


def test_a_killed_peer_counts_as_a_failover_on_the_entry(swarm):
    entry = swarm.peers[0]
    before = scrape(entry)
    killed = []

    def on_token(count):
        if count == 4 and not killed:
            victim = serving_replica(swarm, "2:4")
            victim.kill()
            killed.append(victim)

    text, finish, _ = stream_chat(entry, on_token, n=48, prompt="a long story", model="llama")
    assert killed and finish == "length"
    after = scrape(entry)
    assert value(after, "layerswarm_failovers_total", reason="failed") > value(
        before, "layerswarm_failovers_total", reason="failed"
    )
    wait_until(lambda: value(scrape(entry), "layerswarm_table_peers", status="serving") == 2, 30, swarm._why)


def test_json_log_lines_carry_the_request_id(capsys):
    import json
    import logging

    from peers.transport.logs import REQUEST_ID, setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("json")
        token = REQUEST_ID.set("trace-7")
        logging.getLogger("layerswarm.test").info("hello %s", "world")
        REQUEST_ID.reset(token)
        logging.getLogger("layerswarm.test").warning("no request")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines()[-2:])
    assert first["message"] == "hello world" and first["request_id"] == "trace-7" and first["level"] == "info"
    assert second["level"] == "warning" and "request_id" not in second
    with pytest.raises(ValueError, match="log-format"):
        setup_logging("xml")
