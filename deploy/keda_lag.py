"""What KEDA's nats-jetstream scaler sees of a comfyq pool, from a NATS
monitoring endpoint.

    python3 deploy/keda_lag.py --monitor http://127.0.0.1:8222 --pool default

KEDA reads /jsz?acc=<account>&consumers=true&config=true and takes, for the
named stream and consumer, num_pending + num_ack_pending (its getMaxMsgLag).
The chart's NATS triggers:
  backlog   <PREFIX>_PENDING / dispatcher: the lease-holding scheduler's
            consumer of the work queue, which holds every waiting job until
            it dispatches it: the backlog of all pools
  inFlight  <PREFIX>_DISPATCH / dispatch-<pool>: the runners' consumer:
            unpulled + running jobs
"""

import argparse
import json
import urllib.request


def stream_name(prefix, suffix):
    return f"{prefix.upper().replace('-', '_')}_{suffix}"


def lag(monitor, account, stream, consumer):
    url = f"{monitor}/jsz?acc={account}&consumers=true&config=true"
    with urllib.request.urlopen(url, timeout=5) as answer:
        jsz = json.load(answer)
    for acc in jsz.get("account_details", []):
        if acc["name"] != account:
            continue
        for s in acc.get("stream_detail", []):
            if s["name"] != stream:
                continue
            for c in s.get("consumer_detail", []):
                if c["name"] == consumer:
                    return c["num_pending"] + c["num_ack_pending"], c["num_pending"], c["num_ack_pending"]
            return None, "consumer missing", s["state"]["last_seq"]
    return None, "stream missing", None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--monitor", default="http://127.0.0.1:8222")
    p.add_argument("--account", default="$G")
    p.add_argument("--prefix", default="comfyq")
    p.add_argument("--pool", default="default")
    a = p.parse_args()
    for trigger, stream, consumer in (
        ("backlog", stream_name(a.prefix, "PENDING"), "dispatcher"),
        ("inFlight", stream_name(a.prefix, "DISPATCH"), f"dispatch-{a.pool}"),
    ):
        total, pending, ack_pending = lag(a.monitor, a.account, stream, consumer)
        print(json.dumps({"trigger": trigger, "stream": stream, "consumer": consumer,
                          "lag": total, "num_pending": pending, "num_ack_pending": ack_pending}))


if __name__ == "__main__":
    main()
