#!/usr/bin/env python3
"""Publish one wxpush job, the way a business system does.

The job goes to the jobs queue through the default exchange, persistent, as JSON, with publisher
confirms and `mandatory`: when this returns, RabbitMQ has the job on disk, and a missing queue or
a refused message is an error here instead of a silent loss.

    WXPUSH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python publisher.py \
        --job-id order-42-paid --touser oia2TjuEGTNoeX76QEjQNrcURxG8 \
        --template-id ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY \
        --data thing1=黄先生 --data amount2=260.00元

Settings come from the same variables as wxpush itself: WXPUSH_AMQP_URL, WXPUSH_JOBS_QUEUE.
"""

import argparse
import json
import os
import sys

import pika


def build_job(args):
    data = {}
    for item in args.data:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"--data takes KEY=VALUE, not {item!r}")
        # Only `value` matters to WeChat today: colours, `first` and `remark` are no longer shown.
        data[key] = {"value": value}
    job = {"job_id": args.job_id, "touser": args.touser, "template_id": args.template_id, "data": data}
    if args.account:
        job["account"] = args.account
    if args.url:
        job["url"] = args.url
    return job


def publish(connection_url, queue, job):
    connection = pika.BlockingConnection(pika.URLParameters(connection_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=json.dumps(job, ensure_ascii=False).encode("utf-8"),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=job["job_id"],
            ),
            mandatory=True,
        )
    finally:
        connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-id", required=True, help="your id for this notification (1-128 characters)")
    parser.add_argument("--touser", required=True, help="the recipient's openid")
    parser.add_argument("--template-id", required=True)
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE", help="a template keyword; repeat")
    parser.add_argument("--account", help="the configured account that sends it (default: `default`)")
    parser.add_argument("--url", help="the page the message opens")
    args = parser.parse_args()
    if not args.data:
        parser.error("at least one --data KEY=VALUE")

    url = os.environ.get("WXPUSH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = os.environ.get("WXPUSH_JOBS_QUEUE", "wxpush.jobs")
    job = build_job(args)
    try:
        publish(url, queue, job)
    except pika.exceptions.UnroutableError:
        sys.exit(f"no queue {queue!r}: start a wxpush worker once (it declares the queue) or set WXPUSH_JOBS_QUEUE")
    except pika.exceptions.NackError:
        sys.exit(f"RabbitMQ refused the job {job['job_id']!r} (queue full?): publish it again later")
    except pika.exceptions.AMQPConnectionError as e:
        sys.exit(f"cannot reach RabbitMQ ({e!r}): start it or set WXPUSH_AMQP_URL")
    print(f"published {job['job_id']} to {queue}")


if __name__ == "__main__":
    main()
