package com.example.wxpush;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonProperty;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import org.springframework.amqp.core.ExchangeTypes;
import org.springframework.amqp.core.MessageDeliveryMode;
import org.springframework.amqp.rabbit.annotation.Exchange;
import org.springframework.amqp.rabbit.annotation.Queue;
import org.springframework.amqp.rabbit.annotation.QueueBinding;
import org.springframework.amqp.rabbit.annotation.RabbitListener;
import org.springframework.amqp.rabbit.connection.CorrelationData;
import org.springframework.amqp.rabbit.core.RabbitTemplate;
import org.springframework.amqp.support.AmqpHeaders;
import org.springframework.amqp.support.converter.Jackson2JsonMessageConverter;
import org.springframework.amqp.support.converter.MessageConverter;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.CommandLineRunner;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.condition.ConditionalOnProperty;
import org.springframework.context.ConfigurableApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.messaging.handler.annotation.Header;
import org.springframework.stereotype.Component;

/**
 * wxpush from Spring AMQP: {@link JobPublisher} publishes a job the way a business system does,
 * {@link ResultsConsumer} handles send results and delivery receipts.
 */
@SpringBootApplication
public class WxpushExample {

  public static void main(String[] args) {
    ConfigurableApplicationContext context = SpringApplication.run(WxpushExample.class, args);
    if ("publish".equals(context.getEnvironment().getProperty("example.mode"))) {
      System.exit(SpringApplication.exit(context));
    }
  }

  /** JSON in and out: content_type application/json, as wxpush expects and publishes. */
  @Bean
  MessageConverter jsonMessageConverter(ObjectMapper mapper) {
    return new Jackson2JsonMessageConverter(mapper);
  }

  /**
   * Publishes one job: persistent, through the default exchange to the jobs queue, and waits for
   * RabbitMQ's confirm. A missing queue (the message comes back: {@code mandatory}) or a nack is
   * an error here instead of a silent loss.
   */
  @Component
  @ConditionalOnProperty(name = "example.mode", havingValue = "publish")
  static class JobPublisher implements CommandLineRunner {
    private final RabbitTemplate rabbit;
    private final String jobsQueue;

    JobPublisher(RabbitTemplate rabbit, @Value("${wxpush.jobs-queue}") String jobsQueue) {
      this.rabbit = rabbit;
      this.jobsQueue = jobsQueue;
    }

    @Override
    public void run(String... args) throws Exception {
      String jobId = "order-42-paid";
      // Only "value" matters to WeChat today: colours, "first" and "remark" are no longer shown.
      Map<String, Object> job =
          Map.of(
              "job_id", jobId,
              "touser", "oia2TjuEGTNoeX76QEjQNrcURxG8",
              "template_id", "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
              "data",
                  Map.of(
                      "thing1", Map.of("value", "黄先生"),
                      "amount2", Map.of("value", "260.00元")));
      CorrelationData confirm = new CorrelationData(jobId);
      rabbit.convertAndSend(
          "",
          jobsQueue,
          job,
          message -> {
            message.getMessageProperties().setMessageId(jobId);
            message.getMessageProperties().setDeliveryMode(MessageDeliveryMode.PERSISTENT);
            return message;
          },
          confirm);
      CorrelationData.Confirm answer = confirm.getFuture().get(10, TimeUnit.SECONDS);
      // A return comes before the confirm, so it is known by now.
      if (confirm.getReturned() != null) {
        throw new IllegalStateException(
            "no queue " + jobsQueue + ": start a wxpush worker once (it declares the queue)");
      }
      if (!answer.isAck()) {
        throw new IllegalStateException("RabbitMQ refused job " + jobId + ": " + answer.getReason());
      }
      System.out.println("published " + jobId + " to " + jobsQueue);
    }
  }

  /**
   * A send result or a delivery event; the fields this example uses. {@code msgid} is WeChat's
   * 64-bit id: a {@code Long} holds it exactly (a double would not).
   */
  @JsonIgnoreProperties(ignoreUnknown = true)
  record Result(
      String type,
      @JsonProperty("job_id") String jobId,
      Long msgid,
      String status,
      String reason) {}

  /**
   * Consumes results from a durable queue of its own, bound to the results exchange. The exchange
   * is wxpush's (declared by the worker with its own arguments): bind to it, never declare it.
   * Results can repeat: handle them idempotently.
   */
  @Component
  @ConditionalOnProperty(name = "example.mode", havingValue = "consume", matchIfMissing = true)
  static class ResultsConsumer {
    private final Set<String> seen = ConcurrentHashMap.newKeySet();

    @RabbitListener(
        bindings =
            @QueueBinding(
                value = @Queue(name = "${example.results-queue}", durable = "true"),
                exchange =
                    @Exchange(
                        name = "${wxpush.results-exchange}",
                        type = ExchangeTypes.TOPIC,
                        declare = "false"),
                key = {"send.*", "delivery.*"}))
    void onResult(Result result, @Header(AmqpHeaders.RECEIVED_ROUTING_KEY) String routingKey) {
      String key = result.type() + "/" + result.jobId() + "/" + result.msgid() + "/" + result.status();
      if (!seen.add(key)) {
        return; // already handled
      }
      switch (routingKey) {
        case "send.succeeded" ->
            System.out.println("sent: job " + result.jobId() + " msgid " + result.msgid());
        case "send.failed" ->
            System.out.println("failed: job " + result.jobId() + ": " + result.reason());
        default ->
            System.out.println(
                routingKey + ": job " + result.jobId() + " msgid " + result.msgid());
      }
    }
  }
}
