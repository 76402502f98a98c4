//! The acknowledger settles out-of-order finishes in runs without ever covering a delivery that
//! is still in progress or was requeued.

use std::time::Duration;

use crate::harness::*;
use crate::wx::{Acknowledger, Disposition};
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_finishes_are_acked_and_requeues_come_back() {
    let ns = unique("acks");
    let env = TestEnv::new("acks", config(&ns, "http://127.0.0.1:1")).await;
    let queue = env.config.jobs_queue.clone();
    let ch = env.bus.connection.create_channel().await.unwrap();
    ch.queue_declare(ShortString::from(queue.as_str()), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for i in 0..40u32 {
        ch.basic_publish(
            ShortString::from(""),
            ShortString::from(queue.as_str()),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || async { env.queue_len(&queue).await == 40 }).await);

    let consume = env.bus.connection.create_channel().await.unwrap();
    consume.basic_qos(40, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume
        .basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from("t"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let acks = Acknowledger::start(consume.clone(), Duration::from_millis(2), 8);
    let handle = acks.handle();
    let mut tags = Vec::new();
    for _ in 0..40 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
        handle.delivered(d.delivery_tag);
        tags.push(d.delivery_tag);
    }
    // No more deliveries: a requeued message stays in the queue instead of coming straight back.
    consume.basic_cancel(ShortString::from("t"), lapin::options::BasicCancelOptions::default()).await.unwrap();
    // Finish in a scrambled order; every seventh goes back to the queue; the first stays in
    // progress for a while, so later finishes cannot be covered by a multiple ack meanwhile.
    let first = tags[0];
    let mut order: Vec<u64> = tags[1..].to_vec();
    order.reverse();
    order.rotate_left(13);
    for tag in &order {
        let d = if tag % 7 == 0 { Disposition::Requeue } else { Disposition::Ack };
        handle.finished(*tag, d);
    }
    let requeued = tags[1..].iter().filter(|t| *t % 7 == 0).count() as u32;
    // Acks held behind the first delivery went out one by one after max_wait; requeued ones are
    // back in the queue; the first is still unacknowledged.
    assert!(
        eventually(Duration::from_secs(5), || async { env.queue_len(&queue).await == requeued }).await,
        "the requeued deliveries are back"
    );
    handle.finished(first, Disposition::Ack);
    drop(handle);
    acks.close().await;
    drop(consumer);
    consume.close(200, ShortString::from("done")).await.unwrap();
    // Closing the channel returns whatever was not acknowledged: only the requeued ones remain,
    // and the channel never failed on a bad multiple ack (it closed cleanly above).
    assert!(eventually(Duration::from_secs(5), || async { env.queue_len(&queue).await == requeued }).await);
}
