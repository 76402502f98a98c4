// Consumes wxpush's results: send results and delivery receipts. A durable queue of your own,
// bound to the results exchange, so nothing is missed while this program is down; each result is
// acknowledged only after it has been handled. Results can repeat (a redelivered job publishes its
// recorded result again): handle them idempotently, keyed on job_id (send.*) or msgid + status
// (delivery.*).
//
//	WXPUSH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f go run ./consumer -queue my-app.wxpush-results
package main

import (
	"encoding/json"
	"flag"
	"log"
	"os"
	"strconv"
	"strings"

	amqp "github.com/rabbitmq/amqp091-go"
)

// result holds the fields of both kinds this program uses. msgid is WeChat's 64-bit id: an
// int64 holds it exactly (a float64 would not).
type result struct {
	Type   string  `json:"type"`
	JobID  *string `json:"job_id"`
	MsgID  *int64  `json:"msgid"`
	Status string  `json:"status"`
	Reason *string `json:"reason"`
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func str(s *string) string {
	if s == nil {
		return "(unknown)"
	}
	return *s
}

func num(n *int64) string {
	if n == nil {
		return "(none)"
	}
	return strconv.FormatInt(*n, 10)
}

func main() {
	queue := flag.String("queue", "my-app.wxpush-results", "your durable queue")
	keys := flag.String("bind", "send.*,delivery.*", "routing keys to bind, comma-separated")
	flag.Parse()
	exchange := env("WXPUSH_RESULTS_EXCHANGE", "wxpush.results")

	conn, err := amqp.Dial(env("WXPUSH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
	if err != nil {
		log.Fatalf("cannot reach RabbitMQ (%v): start it or set WXPUSH_AMQP_URL", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		log.Fatal(err)
	}
	if _, err := ch.QueueDeclare(*queue, true, false, false, false, nil); err != nil {
		log.Fatal(err)
	}
	for _, key := range strings.Split(*keys, ",") {
		// The worker declares the exchange (with its own arguments): bind to it, never declare it.
		if err := ch.QueueBind(*queue, strings.TrimSpace(key), exchange, false, nil); err != nil {
			log.Fatalf("cannot bind to %q (has a worker run once?): %v", exchange, err)
		}
	}
	if err := ch.Qos(100, 0, false); err != nil {
		log.Fatal(err)
	}
	deliveries, err := ch.Consume(*queue, "", false, false, false, false, nil)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("consuming %s (bound to %s)", *queue, exchange)

	for d := range deliveries {
		var r result
		if err := json.Unmarshal(d.Body, &r); err != nil {
			// Not a result: keep it out of the way rather than redelivering it forever.
			log.Printf("unreadable result: %v", err)
			_ = d.Nack(false, false)
			continue
		}
		switch {
		case d.RoutingKey == "send.succeeded":
			log.Printf("sent: job %s msgid %s", str(r.JobID), num(r.MsgID))
		case d.RoutingKey == "send.failed":
			log.Printf("failed: job %s: %s", str(r.JobID), str(r.Reason))
		case strings.HasPrefix(d.RoutingKey, "delivery."):
			log.Printf("delivered (%s): job %s msgid %s", r.Status, str(r.JobID), num(r.MsgID))
		default:
			log.Printf("%s: %s", d.RoutingKey, d.Body)
		}
		if err := d.Ack(false); err != nil {
			log.Fatal(err)
		}
	}
}
