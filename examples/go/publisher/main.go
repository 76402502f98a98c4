// Publishes one wxpush job, the way a business system does: persistent JSON on the jobs queue
// through the default exchange, with publisher confirms and `mandatory`, so that a missing queue
// or a refused message is an error here instead of a silent loss.
//
//	WXPUSH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f go run ./publisher \
//	    -job-id order-42-paid -touser oia2TjuEGTNoeX76QEjQNrcURxG8 \
//	    -template-id ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY -data thing1=黄先生 -data amount2=260.00元
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

type keyword struct {
	// Only value matters to WeChat today: colours, `first` and `remark` are no longer shown.
	Value string `json:"value"`
}

type job struct {
	JobID      string             `json:"job_id"`
	Account    string             `json:"account,omitempty"`
	ToUser     string             `json:"touser"`
	TemplateID string             `json:"template_id"`
	URL        string             `json:"url,omitempty"`
	Data       map[string]keyword `json:"data"`
}

type dataFlags map[string]keyword

func (d dataFlags) String() string { return fmt.Sprint(map[string]keyword(d)) }
func (d dataFlags) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, not %q", s)
	}
	d[k] = keyword{Value: v}
	return nil
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	data := dataFlags{}
	j := job{}
	flag.StringVar(&j.JobID, "job-id", "", "your id for this notification (1-128 characters)")
	flag.StringVar(&j.ToUser, "touser", "", "the recipient's openid")
	flag.StringVar(&j.TemplateID, "template-id", "", "the template")
	flag.StringVar(&j.Account, "account", "", "the configured account that sends it (default: `default`)")
	flag.StringVar(&j.URL, "url", "", "the page the message opens")
	flag.Var(data, "data", "a template keyword as KEY=VALUE; repeat")
	flag.Parse()
	if j.JobID == "" || j.ToUser == "" || j.TemplateID == "" || len(data) == 0 {
		flag.Usage()
		os.Exit(2)
	}
	j.Data = data
	queue := env("WXPUSH_JOBS_QUEUE", "wxpush.jobs")

	conn, err := amqp.Dial(env("WXPUSH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
	if err != nil {
		log.Fatalf("cannot reach RabbitMQ (%v): start it or set WXPUSH_AMQP_URL", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		log.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		log.Fatal(err)
	}
	// RabbitMQ returns an unroutable mandatory message before it confirms it.
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))

	body, err := json.Marshal(j)
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	confirm, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, true, false, amqp.Publishing{
		ContentType:  "application/json",
		DeliveryMode: amqp.Persistent,
		MessageId:    j.JobID,
		Body:         body,
	})
	if err != nil {
		log.Fatal(err)
	}
	acked, err := confirm.WaitContext(ctx)
	if err != nil {
		log.Fatalf("no confirm for %s: %v; publish it again (wxpush sends a job_id once)", j.JobID, err)
	}
	select {
	case <-returns:
		log.Fatalf("no queue %q: start a wxpush worker once (it declares the queue) or set WXPUSH_JOBS_QUEUE", queue)
	default:
	}
	if !acked {
		log.Fatalf("RabbitMQ refused the job %s (queue full?): publish it again later", j.JobID)
	}
	fmt.Printf("published %s to %s\n", j.JobID, queue)
}
