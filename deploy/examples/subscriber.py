"""Follow one comfyq job's events over NATS (nats-py).

    python3 deploy/examples/subscriber.py nats://127.0.0.1:4222 <tenant> <job-id>

Replays the job's events from the start of the EVENTS stream, then follows
it live, printing one line per event, and exits after the terminal one.
"""

import asyncio
import json
import sys

import nats
from nats.js.api import DeliverPolicy

TERMINAL = {"job.completed", "job.failed", "job.cancelled"}


async def follow(url: str, tenant: str, job: str, prefix: str = "comfyq") -> int:
    nc = await nats.connect(url)
    js = nc.jetstream()
    # An ordered consumer replays everything on the job's subjects, in order.
    sub = await js.subscribe(
        f"{prefix}.events.{tenant}.{job}.>",
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    status = 1
    try:
        while True:
            msg = await sub.next_msg(timeout=30)
            event = json.loads(msg.data)
            data = event["data"]
            detail = data.get("status") or data.get("node_id") or ""
            if event["type"] == "job.progress":
                detail = f"{data['node_id']} {data['fraction']:.0%}"
            print(f"{msg.metadata.sequence.stream} {event['type']} {detail}".rstrip(), flush=True)
            if event["type"] in TERMINAL:
                status = 0 if event["type"] == "job.completed" else 2
                break
    finally:
        await nc.close()
    return status


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(64)
    sys.exit(asyncio.run(follow(*sys.argv[1:])))
