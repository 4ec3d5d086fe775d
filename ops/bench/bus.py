"""Bus benchmark: Rucher's publish + consumer and request/reply paths vs raw nats-py.

Run: .venv/bin/python ops/bench/bus.py [--url nats://HOST:PORT] [--events N] [--requests N]

Without --url it starts its own nats-server (JetStream, temporary store) and removes it after.
Both sides run on the same server in the same process, alternating, best of --rounds:

- events: N events published with JetStream async publish (same ack mode, same Nats-Msg-Id
  header), then consumed by a durable pull consumer with explicit acks. Rucher's side goes
  through Bus.publish_async and rucher.bus.consumer (encode, validate on decode, outcome
  mapping); the raw side sends pre-encoded bytes and acks without decoding.
- request/reply: sequential requests; Rucher's side is Bus.serve (a NATS micro endpoint with
  typed decode/encode) and Bus.request; the raw side is nc.subscribe + msg.respond and
  nc.request with the same bytes.

Last line: RESULT events_ratio=<rucher/raw events per s> rr_overhead_p50_ms=<rucher-raw p50>
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
from nats.aio.msg import Msg
from nats.js import api

from rucher.bus import Bus
from rucher.bus.client import MSG_ID
from rucher.bus.consumer import Delivery, consume
from rucher.bus.provision import provision
from rucher.proto.base import Command, Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.streams import EVENTS
from rucher.testing.nats import NatsServer


class BenchEvent(Event, frozen=True, kw_only=True, tag="bench.happened"):
    vmid: int
    detail: str


class BenchRequest(Command, frozen=True, kw_only=True, tag="bench.ask"):
    vmid: int


class BenchReply(Reply, frozen=True, kw_only=True, tag="bench.answer"):
    vmid: int
    status: str


HAPPENED = Subject("evt.bench.happened.{node}", BenchEvent, Kind.EVENT, Scope.NODE, "bench")
RAW_SUBJECT = "evt.bench.raw.n1"
ASK = RpcSubject("rpc.bench.ask", BenchRequest, Kind.RPC, Scope.CLUSTER, "bench", reply=BenchReply)
RAW_RPC = "rpc.bench.raw"


def _event(n: int) -> BenchEvent:
    return BenchEvent(event_id=f"e{n}", node="n1", time=time.time(), vmid=100 + n, detail="x" * 64)


async def _purge(bus: Bus) -> None:
    await bus.js.purge_stream(EVENTS.name)


async def rucher_events(bus: Bus, count: int, round_no: int) -> float:
    await _purge(bus)
    events = [_event(n) for n in range(count)]
    done = asyncio.Event()
    seen = 0

    async def handle(event: BenchEvent, delivery: Delivery) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    start = time.perf_counter()
    address = HAPPENED.to(node="n1")
    acks = [
        await bus.publish_async(address, event, msg_id=f"r{round_no}-{event.event_id}")
        for event in events
    ]
    await asyncio.gather(*acks)
    consumer = await consume(
        bus,
        stream=EVENTS,
        durable=f"bench-rucher-{round_no}",
        filter_subject=HAPPENED.wildcard(),
        payload=BenchEvent,
        handler=handle,
        batch=256,
    )
    await done.wait()
    elapsed = time.perf_counter() - start
    await consumer.stop()
    await bus.js.delete_consumer(EVENTS.name, f"bench-rucher-{round_no}")
    return count / elapsed


async def raw_events(bus: Bus, count: int, round_no: int) -> float:
    await _purge(bus)
    payloads = [msgspec.json.encode(_event(n)) for n in range(count)]
    js = bus.js
    start = time.perf_counter()
    acks = [
        await js.publish_async(RAW_SUBJECT, payload, headers={MSG_ID: f"w{round_no}-e{n}"})
        for n, payload in enumerate(payloads)
    ]
    await asyncio.gather(*acks)
    config = api.ConsumerConfig(
        durable_name=f"bench-raw-{round_no}",
        ack_policy=api.AckPolicy.EXPLICIT,
        filter_subject=RAW_SUBJECT,
        max_ack_pending=1000,
    )
    sub = await js.pull_subscribe(
        RAW_SUBJECT, durable=f"bench-raw-{round_no}", stream=EVENTS.name, config=config
    )
    seen = 0
    while seen < count:
        for msg in await sub.fetch(256, timeout=5):
            await msg.ack()
            seen += 1
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    await js.delete_consumer(EVENTS.name, f"bench-raw-{round_no}")
    return count / elapsed


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def rucher_requests(server: Bus, client: Bus, count: int) -> list[float]:
    request = BenchRequest(command_id="c", vmid=100)
    for _ in range(200):
        await client.request(ASK.address, request)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await client.request(ASK.address, request)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def raw_requests(client: Bus, count: int) -> list[float]:
    payload = msgspec.json.encode(BenchRequest(command_id="c", vmid=100))
    for _ in range(200):
        await client.nc.request(RAW_RPC, payload, timeout=5)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await client.nc.request(RAW_RPC, payload, timeout=5)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def run(url: str, events: int, requests: int, rounds: int) -> tuple[float, float]:
    server = await Bus.connect(url, node="n1", service="bench")
    client = await Bus.connect(url, node="n2", service="benchclient")
    await provision(server)

    async def answer(request: BenchRequest, headers: dict[str, str]) -> BenchReply:
        return BenchReply(vmid=request.vmid, status="running")

    reply_bytes = msgspec.json.encode(BenchReply(vmid=100, status="running"))

    async def raw_answer(msg: Msg) -> None:
        await msg.respond(reply_bytes)

    await server.serve(ASK, answer)
    await server.nc.subscribe(RAW_RPC, queue="bench", cb=raw_answer)
    await server.nc.flush()

    rucher_rates, raw_rates = [], []
    for round_no in range(rounds):
        raw_rates.append(await raw_events(server, events, round_no))
        rucher_rates.append(await rucher_events(server, events, round_no))
        raw_now, ours_now = raw_rates[-1], rucher_rates[-1]
        print(f"round {round_no + 1}: raw {raw_now:,.0f} ev/s  rucher {ours_now:,.0f} ev/s")
    raw_rate, rucher_rate = max(raw_rates), max(rucher_rates)

    raw_p50s, rucher_p50s, raw_p99s, rucher_p99s = [], [], [], []
    for _ in range(rounds):
        raw = await raw_requests(client, requests)
        ours = await rucher_requests(server, client, requests)
        raw_p50s.append(statistics.median(raw))
        rucher_p50s.append(statistics.median(ours))
        raw_p99s.append(_percentile(raw, 0.99))
        rucher_p99s.append(_percentile(ours, 0.99))
    raw_p50, rucher_p50 = min(raw_p50s), min(rucher_p50s)
    ratio = rucher_rate / raw_rate
    print(f"events/s:      raw {raw_rate:,.0f}   rucher {rucher_rate:,.0f}   ratio {ratio:.2f}")
    print(
        f"request p50:   raw {raw_p50:.3f} ms   rucher {rucher_p50:.3f} ms   "
        f"(+{rucher_p50 - raw_p50:.3f} ms)"
    )
    print(f"request p99:   raw {min(raw_p99s):.3f} ms   rucher {min(rucher_p99s):.3f} ms")
    await client.close(grace=1)
    await server.close(grace=1)
    return rucher_rate / raw_rate, rucher_p50 - raw_p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing NATS server (default: start one)")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = None
    with tempfile.TemporaryDirectory(prefix="rucher-bench-") as tmp:
        url = args.url
        if url is None:
            server = NatsServer(name="bench", store_dir=Path(tmp) / "js")
            server.start()
            server.wait_ready()
            url = server.url
            print(f"started nats-server at {url}")
        try:
            ratio, overhead = asyncio.run(run(url, args.events, args.requests, args.rounds))
        finally:
            if server is not None:
                server.stop()
    print(f"RESULT events_ratio={ratio:.2f} rr_overhead_p50_ms={overhead:.3f}")


if __name__ == "__main__":
    main()
