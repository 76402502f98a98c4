#!/usr/bin/env python3
"""Consume wxpush's results: send results and delivery receipts, one JSON line each.

A durable queue of your own, bound to the results exchange with the routing keys you care about,
so nothing is missed while this program is down. Each result is acknowledged only after it has
been handled. Results can repeat (a redelivered job publishes its recorded result again): handle
them idempotently, keyed on job_id (send.*) or msgid + status (delivery.*).

    WXPUSH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python consumer.py --queue my-app.wxpush-results

Settings come from the same variables as wxpush itself: WXPUSH_AMQP_URL, WXPUSH_RESULTS_EXCHANGE.
With --expect JOB_ID it exits 0 once that job's send result arrives (1 on --timeout): how the
examples are checked in CI.
"""

import argparse
import json
import os
import sys
import time

import pika


def handle(routing_key, result, seen):
    """Your business logic goes here. Returns True when the result is new."""
    key = (result.get("type"), result.get("job_id"), result.get("msgid"), result.get("status"))
    if key in seen:
        return False
    seen.add(key)
    if routing_key == "send.succeeded":
        # msgid is a 64-bit integer; Python's int holds it exactly (a JavaScript number would not).
        print(f"sent: job {result['job_id']} msgid {result['msgid']}", file=sys.stderr)
    elif routing_key == "send.failed":
        print(f"failed: job {result['job_id']}: {result['reason']}", file=sys.stderr)
    elif routing_key.startswith("delivery."):
        print(f"delivered ({result['status']}): job {result.get('job_id')} msgid {result['msgid']}", file=sys.stderr)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", default="my-app.wxpush-results", help="your durable queue")
    parser.add_argument("--bind", action="append", help="routing keys to bind (default: send.* and delivery.*)")
    parser.add_argument("--expect", metavar="JOB_ID", help="exit once this job's send result arrived")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds")
    args = parser.parse_args()

    url = os.environ.get("WXPUSH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    exchange = os.environ.get("WXPUSH_RESULTS_EXCHANGE", "wxpush.results")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=args.queue, durable=True)
    for key in args.bind or ["send.*", "delivery.*"]:
        # The worker declares the exchange; binding before it ever ran fails with NOT_FOUND.
        channel.queue_bind(queue=args.queue, exchange=exchange, routing_key=key)
    channel.basic_qos(prefetch_count=100)
    print(f"ready: consuming {args.queue} (bound to {exchange})", flush=True)

    deadline = time.monotonic() + args.timeout if args.timeout else None
    seen = set()
    try:
        for method, properties, body in channel.consume(args.queue, inactivity_timeout=1):
            if method is None:
                if deadline and time.monotonic() > deadline:
                    print(f"timed out waiting for {args.expect or 'results'}", file=sys.stderr)
                    sys.exit(1)
                continue
            result = json.loads(body)
            if handle(method.routing_key, result, seen):
                print(json.dumps({"routing_key": method.routing_key, "result": result}, ensure_ascii=False), flush=True)
            channel.basic_ack(method.delivery_tag)
            if args.expect and result.get("type") == "send" and result.get("job_id") == args.expect:
                return
    finally:
        connection.close()


if __name__ == "__main__":
    main()
