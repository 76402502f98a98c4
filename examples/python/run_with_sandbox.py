#!/usr/bin/env python3
"""Run the two examples end to end against a real worker, with the sandbox standing in for WeChat.

Starts wxpush-sandbox and wxpush-worker on queue, exchange and Redis prefix names of their own
(`wxpush-example-<random>`, removed at the end: a deployment on the same broker is not touched),
starts consumer.py, publishes a job with publisher.py, and checks that its send.succeeded result
arrives and that the sandbox received exactly one message. CI runs it (.ci/run); try it with

    cargo build --bin wxpush-worker --bin wxpush-sandbox
    python examples/python/run_with_sandbox.py --bin-dir target/debug

RabbitMQ and Redis: WXPUSH_TEST_AMQP_URL / WXPUSH_TEST_REDIS_URL, defaults the local ones
(scripts/services up starts them). Needs pika (requirements.txt) and, for the clean-up of the
Redis keys, redis-cli.
"""

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pika

HERE = os.path.dirname(os.path.abspath(__file__))
APPID, SECRET = "wxexample0000001", "example-secret"
DELAY_TIERS = [1, 5]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except OSError as e:
        return None, str(e)


def wait_for(what, check, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def clean_up(amqp_url, redis_url, ns, queues):
    try:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        for q in queues:
            connection.channel().queue_delete(queue=q)
        connection.channel().exchange_delete(exchange=f"{ns}.results")
        connection.close()
    except pika.exceptions.AMQPError as e:
        print(f"clean-up: RabbitMQ: {e!r}", file=sys.stderr)
    try:
        keys = subprocess.run(["redis-cli", "-u", redis_url, "--scan", "--pattern", f"{ns}:*"],
                              capture_output=True, text=True, timeout=30).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "-u", redis_url, "DEL", *keys[i:i + 500]], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"clean-up: Redis keys under {ns}: {e!r}", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", default="target/debug", help="where wxpush-worker and wxpush-sandbox are")
    args = parser.parse_args()

    amqp_url = os.environ.get("WXPUSH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    redis_url = os.environ.get("WXPUSH_TEST_REDIS_URL", "redis://127.0.0.1:6379/")
    ns = "wxpush-example-" + secrets.token_hex(5)
    jobs, results_queue, job_id = f"{ns}.jobs", f"{ns}.my-app-results", f"{ns}-order-42-paid"
    queues = [jobs, f"{jobs}.dead", results_queue] + [f"{jobs}.delay.{t}s" for t in DELAY_TIERS]
    sandbox_port, metrics_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"

    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    config.write(f"[retry]\ndelay_tiers_secs = {DELAY_TIERS}\n")
    config.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WXPUSH_")}
    worker_env = dict(env, WXPUSH_CONFIG=config.name, WXPUSH_AMQP_URL=amqp_url, WXPUSH_REDIS_URL=redis_url,
                      WXPUSH_REDIS_PREFIX=ns, WXPUSH_WECHAT_API_BASE=sandbox_url, WXPUSH_JOBS_QUEUE=jobs,
                      WXPUSH_RESULTS_EXCHANGE=f"{ns}.results", WXPUSH_DEAD_LETTER_QUEUE=f"{jobs}.dead",
                      WXPUSH_METRICS_LISTEN=f"127.0.0.1:{metrics_port}", WXPUSH_APPID=APPID,
                      WXPUSH_APPSECRET=SECRET, RUST_LOG="warn")
    examples_env = dict(env, WXPUSH_AMQP_URL=amqp_url, WXPUSH_JOBS_QUEUE=jobs, WXPUSH_RESULTS_EXCHANGE=f"{ns}.results")

    children = []
    try:
        children.append(subprocess.Popen(
            [os.path.join(args.bin_dir, "wxpush-sandbox"), "--listen", f"127.0.0.1:{sandbox_port}",
             "--account", f"{APPID}:{SECRET}"], env=dict(env, RUST_LOG="warn")))
        wait_for("the sandbox", lambda: http_get(f"{sandbox_url}/_sandbox/stats")[0] == 200, 30)
        children.append(subprocess.Popen([os.path.join(args.bin_dir, "wxpush-worker")], env=worker_env))
        wait_for("the worker to be ready", lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200, 60)

        consumer = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "consumer.py"), "--queue", results_queue, "--expect", job_id,
             "--timeout", "60"], env=examples_env, stdout=subprocess.PIPE, text=True)
        children.append(consumer)
        ready = consumer.stdout.readline()
        if not ready.startswith("ready"):
            raise SystemExit(f"consumer.py did not start: {ready!r}")

        subprocess.run(
            [sys.executable, os.path.join(HERE, "publisher.py"), "--job-id", job_id,
             "--touser", "oia2TjuEGTNoeX76QEjQNrcURxG8", "--template-id", "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
             "--data", "thing1=黄先生", "--data", "amount2=260.00元"], env=examples_env, check=True, timeout=60)

        out, _ = consumer.communicate(timeout=90)
        if consumer.returncode != 0:
            raise SystemExit(f"consumer.py exited {consumer.returncode}: {out}")
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        mine = [r for r in lines if r["result"].get("job_id") == job_id]
        if not mine or mine[-1]["routing_key"] != "send.succeeded":
            raise SystemExit(f"expected send.succeeded for {job_id}, got {lines}")
        sent = mine[-1]["result"]
        _, stats = http_get(f"{sandbox_url}/_sandbox/stats")
        accepted = json.loads(stats).get("sends_accepted")
        if accepted != 1:
            raise SystemExit(f"the sandbox accepted {accepted} sends, expected 1: {stats}")
        print(f"examples/python: publisher.py -> wxpush-worker -> sandbox -> consumer.py: "
              f"send.succeeded for {job_id}, msgid {sent['msgid']}")
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
        clean_up(amqp_url, redis_url, ns, queues)
        os.unlink(config.name)


if __name__ == "__main__":
    main()
